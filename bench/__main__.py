"""`python -m bench [--quick] [--output PATH]`: run every benchmark, rewrite bench/RESULTS.md.

Each benchmark starts its own dev cluster (primary + 2 replicas) and measures its baseline in the
same run. `--quick` runs each once with tiny sizes: it keeps the scripts working in CI, and its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from bench import (
    catalog,
    consistency,
    failover,
    http,
    instructions,
    migrations,
    move,
    overhead,
    pooler,
    proxy,
    tenants,
)
from bench.common import machine

BENCHMARKS = {
    "overhead": overhead.main,
    "instructions": instructions.main,
    "http": http.main,
    "proxy": proxy.main,
    "failover": failover.main,
    "tenants": tenants.main,
    "migrations": migrations.main,
    "consistency": consistency.main,
    "catalog": catalog.main,
    "move": move.main,
    "pooler": pooler.main,
}
HEADER = """# Benchmark results

Written by `python -m bench` ({mode}) on {date}. Machine: {machine}.
Every ratio compares against a baseline measured in the same run, on the same cluster: each
round measures every variant back to back (in a shuffled or alternating order; the session
overhead bench measures each variant right next to its baseline), and a ratio is the median of
the per-round (per-pair) ratios, so that drift of the machine between rounds cancels out.
Client, servers and load generator share 2 cores of a VM whose speed drifts by tens of percent
within minutes: spreads are wide. Read medians and ratios, not single figures.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args(argv)
    sections = []
    for name in args.only or list(BENCHMARKS):
        sections.append(BENCHMARKS[name](["--quick"] if args.quick else []))
    header = HEADER.format(
        mode="--quick: smoke run, figures meaningless" if args.quick else "full run",
        date=datetime.date.today().isoformat(),
        machine=machine(),
    )
    args.output.write_text(header + "\n" + "\n".join(sections))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
