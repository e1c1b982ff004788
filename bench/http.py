"""HTTP end to end: uvicorn serving the example app (router) vs the baseline app (one engine,
hand-written `get_db`), the same routes, loaded from a separate process on loopback.

Both apps serve the `acme` tenant's database: the router's reads go to the replicas, the
baseline's to the primary. One uvicorn worker each; the load generator is `bench.loadgen`.

    python -m bench.http [--quick] [--rounds N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.config import CONFIG_FILE_ENV
from app.demo import APP_ROLE, demo_config
from bench.common import Series, bench_cluster, paired_ratio, parse_args, publish, table
from pg_session_router.devcluster import DevCluster, free_port

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {
    "read: GET /items?limit=10": ("GET", "/items?limit=10", ""),
    "write: POST /items": ("POST", "/items", '{"name": "bench"}'),
}


@contextmanager
def served(module: str, env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """uvicorn serving `module` on a free port, until the block ends: (port, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
    )
    try:
        wait_ready(port)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc): stable on a noisy VM where
    throughput is not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/items?limit=1", headers={"X-Tenant-ID": "acme"}
    )
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not become ready")
        time.sleep(0.1)


def load(port: int, route: str, *, connections: int, duration: float) -> dict[str, float]:
    method, path, body = ROUTES[route]
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(port),
        "--path",
        path,
        "--method",
        method,
        "--header",
        "X-Tenant-ID: acme",
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]
    if body:
        command += ["--body", body]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    figures: dict[str, float] = json.loads(result.stdout)
    return figures


TOKENS_OFF = "router: example app, consistency tokens off"


def app_envs(cluster: DevCluster, config_file: Path) -> dict[str, dict[str, str]]:
    config_file.write_text(demo_config(cluster))
    return {
        "baseline: one engine, hand-written get_db": {
            "BASELINE_DATABASE_URL": cluster.url(database="acme", user=APP_ROLE)
        },
        "router: example app": {CONFIG_FILE_ENV: str(config_file), **SAME_POOL},
        TOKENS_OFF: {
            CONFIG_FILE_ENV: str(config_file),
            "APP_HTTP__CONSISTENCY_TOKENS": "false",
            **SAME_POOL,
        },
    }


#: The baseline engine's pool is SQLAlchemy's default, 5 + 5 overflow: the router's tenant
#: engines (acme is a database tenant) get the same.
SAME_POOL = {
    "APP_DATABASE__TENANCY__POOL__SIZE": "5",
    "APP_DATABASE__TENANCY__POOL__MAX_OVERFLOW": "5",
}


MODULES = {
    "baseline: one engine, hand-written get_db": "bench.baseline_app:app",
    "router: example app": "app.main:app",
    TOKENS_OFF: "app.main:app",
}


def settle(cluster: DevCluster) -> None:
    """Finish the background work that the previous app's writes left behind (autovacuum of the
    items table, a checkpoint, replay on the replicas): otherwise it runs during, and is
    charged to, whichever app is measured next. Without this, read figures swung 3x between
    rounds."""
    cluster.sql(cluster.primary.name, "VACUUM (ANALYZE) items", database="acme")
    cluster.sql(cluster.primary.name, "CHECKPOINT")
    cluster.wait_replayed()


def measure(
    cluster: DevCluster,
    apps: dict[str, tuple[str, dict[str, str]]],
    *,
    rounds: int,
    connections: int,
    duration: float,
) -> dict[tuple[str, str], dict[str, Series]]:
    results: dict[tuple[str, str], dict[str, Series]] = {}
    names = list(apps)
    for round_number in range(rounds):
        # Rotate the order: each app runs first as often as the others (what runs first in a
        # round tends to measure faster here).
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            module, env = apps[name]
            settle(cluster)
            with served(module, env) as (port, pid):
                for route in ROUTES:  # warm every route, not only the first
                    load(port, route, connections=connections, duration=0.5)
                for route in ROUTES:
                    cpu_before = cpu_seconds(pid)
                    figures = load(port, route, connections=connections, duration=duration)
                    spent = cpu_seconds(pid) - cpu_before
                    figures["cpu_us"] = spent / max(figures["requests"], 1) * 1e6
                    cell = results.setdefault((name, route), {k: Series(k) for k in figures})
                    for key, value in figures.items():
                        cell[key].values.append(value)
    return results


def report(results: dict[tuple[str, str], dict[str, Series]], baseline: str) -> str:
    rows: list[tuple[Any, ...]] = []
    for (name, route), cell in results.items():
        base = results[(baseline, route)]["rps"]
        rows.append(
            (
                route,
                name,
                f"{cell['rps'].median:,.0f}",
                f"±{cell['rps'].spread:.0%}",
                f"{paired_ratio(cell['rps'], base):.3f}",
                f"{cell['cpu_us'].median:,.0f}",
                f"{paired_ratio(cell['cpu_us'], results[(baseline, route)]['cpu_us']):.3f}",
                f"{cell['p50_ms'].median:.1f}",
                f"{cell['p99_ms'].median:.1f}",
                f"{cell['errors'].median:.0f}",
            )
        )
    rows.sort(key=lambda row: (row[0], row[1] != baseline))
    return table(
        (
            "route",
            "app",
            "requests/s (median)",
            "spread",
            "vs baseline (median of per-round ratios)",
            "server CPU µs per request",
            "CPU vs baseline",
            "p50 ms",
            "p99 ms",
            "errors",
        ),
        rows,
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.http", argv, rounds=5)
    rounds, connections, duration = (1, 4, 0.5) if args.quick else (args.rounds, 32, 5.0)
    with bench_cluster() as cluster:
        envs = app_envs(cluster, cluster.base_dir / "bench-settings.toml")
        apps = {name: (MODULES[name], env) for name, env in envs.items()}
        results = measure(cluster, apps, rounds=rounds, connections=connections, duration=duration)
    return publish(
        "HTTP end to end",
        (
            f"{rounds} rounds; {connections} keep-alive connections for {duration:.1f} s per "
            f"route (every route warmed first); one uvicorn worker per app, the same pool sizes; "
            f"apps in a rotating order; only 2xx answers count as requests; server CPU from "
            f"/proc; load from a separate process.\n\n"
            f"{report(results, next(iter(apps)))}"
        ),
    )


if __name__ == "__main__":
    main()
