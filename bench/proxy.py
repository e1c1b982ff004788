"""Against a proxy: the baseline app behind pgpool-II (streaming-replication mode, reads load
balanced over the replicas) vs the router app talking to the nodes directly. Same cluster,
same routes, same load as `bench.http`.

pgpool-II comes from the system's packages: installed here when missing and we are root
(`apt-get install pgpool2`); otherwise this benchmark is skipped with a message.

    python -m bench.proxy [--quick] [--rounds N]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.demo import APP_ROLE
from bench.common import bench_cluster, parse_args, publish
from bench.http import MODULES, app_envs, measure, report
from pg_session_router.devcluster import DevCluster, free_port

PGPOOL_CANDIDATES = ("pgpool", "/usr/sbin/pgpool")
TITLE = "Against a proxy (pgpool-II)"


def find_pgpool() -> str | None:
    for candidate in PGPOOL_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def ensure_pgpool(*, install: bool) -> tuple[str | None, str]:
    """The pgpool binary, installing Debian's package if we may; else None and why not."""
    found = find_pgpool()
    if found:
        return found, ""
    if not install:
        return None, "pgpool-II is not installed (--quick never installs it)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "pgpool-II is not installed and cannot be installed here (needs root + apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (
        ["apt-get", "install", "-y", "-q", "pgpool2"],
        ["sh", "-c", "apt-get update -q && apt-get install -y -q pgpool2"],
    ):
        subprocess.run(attempt, env=env, capture_output=True, timeout=900, check=False)
        found = find_pgpool()
        if found:
            return found, ""
    return None, "apt-get could not install pgpool2"


def pgpool_conf(cluster: DevCluster, folder: Path, port: int) -> str:
    backends = []
    for index, node in enumerate([cluster.primary, *cluster.replicas]):
        weight = 0 if node.role == "primary" else 1  # reads to the replicas, as the router does
        backends.append(
            f"backend_hostname{index} = '127.0.0.1'\nbackend_port{index} = {node.port}\n"
            f"backend_weight{index} = {weight}\nbackend_flag{index} = 'ALLOW_TO_FAILOVER'\n"
        )
    return f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{folder}'
pcp_listen_addresses = ''
pcp_port = {free_port()}
pcp_socket_dir = '{folder}'
pid_file_name = '{folder}/pgpool.pid'
logdir = '{folder}'
backend_clustering_mode = 'streaming_replication'
{"".join(backends)}
num_init_children = 64
max_pool = 2
load_balance_mode = on
sr_check_period = 0
health_check_period = 0
enable_pool_hba = off
failover_on_backend_error = off
"""


@contextmanager
def pgpool(binary: str, cluster: DevCluster) -> Iterator[int]:
    folder = cluster.base_dir / "pgpool"
    folder.mkdir(exist_ok=True)
    port = free_port()
    conf, pcp = folder / "pgpool.conf", folder / "pcp.conf"
    conf.write_text(pgpool_conf(cluster, folder, port))
    pcp.write_text("")
    log = (folder / "pgpool.log").open("w")
    process = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-F", str(pcp)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        probe = [
            str(cluster.bindir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            APP_ROLE,
            "-d",
            "acme",
            "-XAtc",
            "SELECT 1",
        ]
        while subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"pgpool did not start; see {folder / 'pgpool.log'}")
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.proxy", argv, rounds=3)
    binary, why_not = ensure_pgpool(install=not args.quick)
    if binary is None:
        return publish(TITLE, f"Skipped: {why_not}.")
    rounds, connections, duration = (1, 4, 0.5) if args.quick else (args.rounds, 32, 5.0)
    with bench_cluster() as cluster, pgpool(binary, cluster) as port:
        envs = app_envs(cluster, cluster.base_dir / "bench-settings.toml")
        baseline = "baseline app behind pgpool-II"
        proxied = cluster.url(database="acme", user=APP_ROLE).replace(
            f":{cluster.primary.port}/", f":{port}/"
        )
        apps = {
            baseline: (
                MODULES["baseline: one engine, hand-written get_db"],
                {"BASELINE_DATABASE_URL": proxied},
            ),
            "router: example app, nodes directly": (
                MODULES["router: example app"],
                envs["router: example app"],
            ),
        }
        results = measure(cluster, apps, rounds=rounds, connections=connections, duration=duration)
    return publish(
        TITLE,
        (
            f"pgpool-II: streaming-replication mode, load balancing reads over the replicas "
            f"(primary weight 0). {rounds} rounds; {connections} connections for {duration:.1f} s "
            f"per route.\n\n{report(results, baseline)}"
        ),
    )


if __name__ == "__main__":
    main()
