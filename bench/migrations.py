"""Migrating many schema tenants: wall time and peak memory, against a sequential loop.

`python -m bench.migrations [--quick | --full] [--rounds N]`

Each round migrates a fresh database holding N schema tenants from empty to head, three ways,
in a shuffled order, each in its own process (tree) as an operator would run it:
- the baseline: a django-tenants-style sequential loop (`--loop`): one process, one engine,
  for each schema SET search_path and run Alembic's upgrade, nothing else (no lock, no catalog,
  no summary, and one failure would stop the loop);
- `python -m app migrate` (concurrency 1) and `python -m app migrate --concurrency 4`.
Peak memory is the resident set of the whole process tree (workers included), sampled from
/proc every 20 ms. N is 200 (10 with `--quick`; 200 and 1,000 with `--full`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import APP_ROLE, Series, paired_ratio, publish, table
from pg_session_router.devcluster import DevCluster

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "sequential loop (django-tenants style)": [sys.executable, "-m", "bench.migrations", "--loop"],
    "python -m app migrate": [sys.executable, "-m", "app", "migrate"],
    "python -m app migrate --concurrency 4": [
        sys.executable,
        "-m",
        "app",
        "migrate",
        "--concurrency",
        "4",
    ],
}
BASELINE = "sequential loop (django-tenants style)"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.migrations")
    parser.add_argument("--quick", action="store_true", help="10 tenants, one round (CI smoke)")
    parser.add_argument("--full", action="store_true", help="also 1,000 tenants")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loop:
        asyncio.run(sequential_loop())
        return ""
    sizes = [10] if args.quick else [200, 1000] if args.full else [200]
    rounds = 1 if args.quick else args.rounds
    with DevCluster(replicas=0) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        body = "\n\n".join(measure(cluster, size, rounds) for size in sizes)
    return publish("Migrations", body)


def measure(cluster: DevCluster, tenants: int, rounds: int) -> str:
    seconds = {name: Series(name) for name in VARIANTS}
    memory = {name: Series(name) for name in VARIANTS}
    for round_number in range(rounds):
        for name in random.sample(list(VARIANTS), len(VARIANTS)):
            config = world(cluster, tenants, f"bm{round_number}{list(VARIANTS).index(name)}")
            elapsed, peak = run_measured(VARIANTS[name], config)
            migrated = count_migrated(cluster, config)
            if migrated != tenants:
                raise SystemExit(f"{name}: {migrated} of {tenants} tenants at head")
            seconds[name].values.append(elapsed)
            memory[name].values.append(peak)
    rows = [
        [
            name,
            f"{seconds[name].median:.1f}",
            f"±{seconds[name].spread:.0%}",
            f"{paired_ratio(seconds[name], seconds[BASELINE]):.2f}",
            f"{seconds[name].median / tenants * 1000:.0f}",
            f"{max(memory[name].values):.0f}",
        ]
        for name in VARIANTS
    ]
    headers = [
        "variant",
        "wall s (median)",
        "spread",
        "time vs loop (median of per-round ratios)",
        "ms per tenant",
        "peak RSS MB (process tree)",
    ]
    return (
        f"{tenants} schema tenants, empty to head, {rounds} round(s), variants in a shuffled "
        f"order, every tenant checked at head after each run.\n\n{table(headers, rows)}"
    )


def world(cluster: DevCluster, tenants: int, tag: str) -> Path:
    """A fresh database with `tenants` schema tenants in its configuration file."""
    database = f"{tag}_{tenants}"
    cluster.create_database(database, owner=APP_ROLE)
    lines = ["[database.clusters.main]"]
    lines.append(f'primary = "{cluster.url(database=database, user=APP_ROLE)}"')
    for n in range(tenants):
        lines += [f"[database.tenants.t{n:05d}]", 'strategy = "schema"']
    path = cluster.base_dir / f"{database}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def count_migrated(cluster: DevCluster, config: Path) -> int:
    database = config.stem
    return int(
        cluster.sql(
            "primary",
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = 'alembic_version' AND n.nspname LIKE 't%'",
            database=database,
        )
    )


def run_measured(command: list[str], config: Path) -> tuple[float, float]:
    """Wall seconds, and the peak resident set of the process tree in MB."""
    env = {**os.environ, "APP_CONFIG_FILE": str(config)}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = [0]
    sampler = threading.Thread(target=sample_rss, args=(process, peak), daemon=True)
    sampler.start()
    _, stderr = process.communicate(timeout=3600)
    elapsed = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed: {stderr.decode()[-2000:]}")
    return elapsed, peak[0] / 1024


def sample_rss(process: subprocess.Popen[bytes], peak: list[int]) -> None:
    while process.poll() is None:
        peak[0] = max(peak[0], tree_rss_kb(process.pid))
        time.sleep(0.02)


def tree_rss_kb(pid: int) -> int:
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            # Children hang off the thread that started them (workers are spawned from one).
            children = [
                child
                for task in Path(f"/proc/{current}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        pending += [int(child) for child in children]
    return total


async def sequential_loop() -> None:
    """The baseline: what a hand-written per-schema loop does with the same revisions."""
    from alembic import command
    from sqlalchemy import text

    from app.core.config import load_settings
    from app.db.migrate import app_migrations
    from pg_session_router.db.router import SessionRouter

    settings = load_settings()
    router = SessionRouter.from_settings(settings)
    migrations = app_migrations()
    try:
        engine = router.default_cluster.primary.engine
        for tenant_id in sorted(settings.database.tenants):
            async with engine.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{tenant_id}"'))
                await conn.execute(text(f'SET LOCAL search_path TO "{tenant_id}"'))

                def upgrade(sync_conn: object, schema: str = tenant_id) -> None:
                    config = migrations.alembic_config(connection=sync_conn, schema=schema)
                    command.upgrade(config, "head")

                await conn.run_sync(upgrade)
    finally:
        await router.dispose()


if __name__ == "__main__":
    main()
