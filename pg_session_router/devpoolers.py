"""Connection poolers in front of a dev cluster's nodes, for the pooler tests and benchmarks:
a real PgBouncer in transaction mode. Development tooling, like `devcluster.py`.

Debian's `pgbouncer` package is installed by the run itself when missing (as root, like the
PostgreSQL binaries the cluster fixtures need). PgBouncer refuses to run as root: like the
servers, it runs as `postgres`.
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
        run_as = "postgres" if os.geteuid() == 0 else None
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
            # One server connection per database and user: every client shares it, so a
            # prepared statement or a session setting left behind meets the next client.
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        if run_as:
            shutil.chown(self.folder, run_as, run_as)
            for path in self.folder.iterdir():
                shutil.chown(path, run_as, run_as)
        binary = debian_binary("pgbouncer", "pgbouncer")
        self._process = subprocess.Popen(
            [binary, str(self.folder / "pgbouncer.ini")],
            user=run_as,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_listening()

    def _wait_listening(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.folder / "pgbouncer.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pgbouncer exited: {log}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start listening")

    def url(self, database: str, user: str) -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # immediate shutdown
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
