"""The benchmark scripts keep working (figures are not asserted: no timed tests), and what they
count as failures stays at zero: HTTP errors, and reads lost to a crash under the router."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tables_of(report: str, section: str) -> list[list[dict[str, str]]]:
    """The markdown tables of one `## section` of RESULTS.md, as rows of {column: cell}."""
    body = report.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in body.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if header is None:
            header = cells
            tables.append([])
        elif not set(line) <= set("|-: "):
            tables[-1].append(dict(zip(header, cells, strict=True)))
    return tables


def test_quick_benchmark_run_writes_every_section_without_errors(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    for section in (
        "## Session overhead",
        "## Client instructions per unit of work",
        "## Failover",
        "| raw asyncpg pool |",
        "failed reads",
        "## Migrations",
        "| python -m app migrate --concurrency 4 |",
        "## Read-your-writes and observability",
    ):
        assert section in report

    # HTTP: every app on every route answered every request with a 2xx.
    (http,) = tables_of(report, "HTTP end to end")
    assert len(http) == 6  # 2 routes x (baseline, router, router without tokens)
    for row in http:
        assert float(row["requests/s (median)"].replace(",", "")) > 0, row
        assert row["errors"] == "0", row

    # Failover: the router loses no read to a crashed replica, nor to a crashed primary.
    replica_kill, primary_kill = tables_of(report, "Failover")
    routers = [row for row in replica_kill if row["variant"].startswith("router")]
    assert len(routers) == 2  # router.run, and plain sessions as get_db reads
    for router_row in routers:
        assert router_row["failed reads"] == "0", router_row
    assert [row["failed reads"] for row in primary_kill] == ["0"]

    # Read-your-writes: no strategy that promises it ever read a stale row.
    mix, _ = tables_of(report, "Read-your-writes and observability")
    for row in mix:
        if row["strategy"] != "none":
            assert row["stale reads"] == "0", row
