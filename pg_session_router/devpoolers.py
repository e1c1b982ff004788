"""Connection poolers in front of a dev cluster's nodes, for the pooler tests and benchmarks:
a real PgBouncer in transaction mode, and pgpool-II in front of a primary and its replicas
(load balancing reads itself). Development tooling, like `devcluster.py`.

Debian's `pgbouncer` and `pgpool2` packages are installed by the run itself when missing (as
root, like the PostgreSQL binaries the cluster fixtures need). Both refuse to run as root:
like the servers, they run as `postgres`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pg_session_router.devcluster import free_port


def _hand_over(folder: Path) -> str | None:
    """As root, give the folder and its files to `postgres` (the poolers refuse to run as
    root); the user to run as, or None."""
    if os.geteuid() != 0:
        return None
    for path in (folder, *folder.iterdir()):
        shutil.chown(path, "postgres", "postgres")
    return "postgres"


def debian_binary(name: str, package: str) -> str:
    """The path of `name`, installing Debian's `package` first if it is missing."""
    found = next(filter(None, (shutil.which(c) for c in (name, f"/usr/sbin/{name}"))), None)
    if found is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
            check=True,
            capture_output=True,
            env=env,
        )
        found = next(filter(None, (shutil.which(c) for c in (name, f"/usr/sbin/{name}"))), None)
    assert found is not None, f"{package} did not install {name}"
    return found


class PgBouncer:
    """One PgBouncer in transaction mode, forwarding every database to one server."""

    def __init__(self, server_port: int, *, pool_size: int = 1, users: tuple[str, ...]) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        (self.folder / "users.txt").write_text("".join(f'"{user}" ""\n' for user in users))
        (self.folder / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            "pool_mode = transaction\n"
            # DISCARD ALL after every transaction: no prepared statement piles up on a server
            # connection (what the README asks of deployments too).
            "server_reset_query_always = 1\n"
            # One server connection per database and user: every client shares it, so a
            # prepared statement or a session setting left behind meets the next client.
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        run_as = _hand_over(self.folder)
        binary = debian_binary("pgbouncer", "pgbouncer")
        self._process = subprocess.Popen(
            [binary, str(self.folder / "pgbouncer.ini")],
            user=run_as,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_listening(self._process, self.port, self.folder / "pgbouncer.log")

    def url(self, database: str, user: str) -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        _stop(self._process)
        shutil.rmtree(self.folder, ignore_errors=True)


class PgpoolII:
    """pgpool-II in streaming-replication mode: writes to the primary, reads balanced over the
    replicas (`load_balance_mode`), its own connection cache per child process."""

    def __init__(self, primary_port: int, replica_ports: list[int], *, children: int = 64) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pgpool-"))
        backends = [(primary_port, 0), *((port, 1) for port in replica_ports)]
        lines = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.folder}'",
            "pcp_listen_addresses = ''",
            f"pcp_port = {free_port()}",
            f"pcp_socket_dir = '{self.folder}'",
            "backend_clustering_mode = 'streaming_replication'",
            "load_balance_mode = on",
            "sr_check_period = 0",
            "health_check_period = 0",
            "failover_on_backend_error = off",
            "enable_pool_hba = off",
            f"num_init_children = {children}",
            "max_pool = 4",
            "connection_cache = on",
            f"pid_file_name = '{self.folder / 'pgpool.pid'}'",
            f"logdir = '{self.folder}'",
        ]
        for number, (port, weight) in enumerate(backends):
            lines += [
                f"backend_hostname{number} = '127.0.0.1'",
                f"backend_port{number} = {port}",
                f"backend_weight{number} = {weight}",
                f"backend_flag{number} = 'DISALLOW_TO_FAILOVER'",
            ]
        (self.folder / "pgpool.conf").write_text("\n".join(lines) + "\n")
        (self.folder / "pcp.conf").write_text("")
        run_as = _hand_over(self.folder)
        binary = debian_binary("pgpool", "pgpool2")
        self._log = open(self.folder / "pgpool.log", "wb")  # noqa: SIM115 - closed in stop()
        self._process = subprocess.Popen(
            [
                binary,
                "-n",
                "-f",
                str(self.folder / "pgpool.conf"),
                "-F",
                str(self.folder / "pcp.conf"),
            ],
            user=run_as,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _wait_listening(self._process, self.port, self.folder / "pgpool.log")

    def url(self, database: str, user: str) -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        _stop(self._process)
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _wait_listening(
    process: subprocess.Popen[bytes], port: int, log: Path, within: float = 20.0
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"the pooler exited: {tail}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("the pooler did not start listening")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # immediate shutdown, for both poolers
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
