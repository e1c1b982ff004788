"""Throwaway PostgreSQL clusters: a primary plus N streaming replicas, from installed binaries.

Development tooling, not part of the router: the demo (`python -m app demo`), the test kit
(`pg_session_router.testing`), this project's tests and benchmarks use it. Everything lives in one
temporary folder; servers listen on free loopback ports with trust authentication, which is fine
for a cluster that exists for minutes on 127.0.0.1 and never for anything else.

PostgreSQL refuses to run as root, so when we are root every server command runs as the
`postgres` user and the folder is handed to it. Durability is switched off (fsync, full page
writes): these clusters are rebuilt, never recovered from a power loss.

Fault injection for tests: `stop(node)` (immediate by default, like a crash), `start(node)`,
`pause_replay(node)` / `resume_replay(node)` on a replica, `promote(node)`.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_SERVER_SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
max_connections = 200
shared_buffers = 32MB
wal_level = logical
max_wal_senders = 16
wal_keep_size = 512MB
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 200ms
wal_writer_delay = 10ms
fsync = off
full_page_writes = off
synchronous_commit = off
logging_collector = off
log_min_messages = warning
"""


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class DevClusterError(RuntimeError):
    """A server command failed; the message carries its output."""


def find_bindir() -> Path:
    """PostgreSQL's server binaries: `pg_config --bindir`, else PATH, else /usr/lib/postgresql."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates.extend(Path(path) for path in versions)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise DevClusterError("PostgreSQL server binaries (initdb, pg_ctl) not found")


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgNode:
    name: str
    role: Literal["primary", "replica"]
    port: int
    data_dir: Path
    running: bool = False


class DevCluster:
    """A primary and `replicas` streaming replicas in a temporary folder."""

    def __init__(self, replicas: int = 2, *, base_dir: Path | None = None) -> None:
        self.bindir = find_bindir()
        self._run_as = "postgres" if os.geteuid() == 0 else None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="devcluster-"))
        self.nodes: dict[str, PgNode] = {"primary": self._node("primary", "primary")}
        for i in range(1, replicas + 1):
            self.nodes[f"replica{i}"] = self._node(f"replica{i}", "replica")
        self._torn_down = False

    def _node(self, name: str, role: Literal["primary", "replica"]) -> PgNode:
        return PgNode(name, role, free_port(), self.base_dir / name)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, *, timeout: float = 60) -> DevCluster:
        atexit.register(self.teardown)
        if self._run_as:
            shutil.chown(self.base_dir, self._run_as, self._run_as)
        try:
            self._init_primary()
            for node in self.replicas:
                self._clone_replica(node)
            self.wait_streaming(timeout=timeout)
        except BaseException:
            self.teardown()
            raise
        return self

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.teardown()

    def teardown(self) -> None:
        """Stop every server and delete the folder; safe to call twice, or after a failure."""
        if self._torn_down:
            return
        self._torn_down = True
        for node in self.nodes.values():
            if (node.data_dir / "postmaster.pid").exists():
                self._server(
                    "pg_ctl", "-D", str(node.data_dir), "-m", "immediate", "stop", check=False
                )
            node.running = False
        shutil.rmtree(self.base_dir, ignore_errors=True)
        atexit.unregister(self.teardown)

    @property
    def primary(self) -> PgNode:
        return next(node for node in self.nodes.values() if node.role == "primary")

    @property
    def replicas(self) -> list[PgNode]:
        return [node for node in self.nodes.values() if node.role == "replica"]

    def _init_primary(self) -> None:
        node = self.nodes["primary"]
        self._server(
            "initdb",
            "-D",
            str(node.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        )
        with open(node.data_dir / "postgresql.conf", "a") as conf:
            conf.write(_SERVER_SETTINGS.format(port=node.port, socket_dir=self.base_dir))
        self.start_node("primary")

    def _clone_replica(self, node: PgNode) -> None:
        primary = self.nodes["primary"]
        self._server(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(node.data_dir),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        with open(node.data_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"\nport = {node.port}\n")
        self.start_node(node.name)

    # -- fault injection -----------------------------------------------------------------

    def start_node(self, name: str) -> None:
        node = self.nodes[name]
        self._server(
            "pg_ctl",
            "-D",
            str(node.data_dir),
            "-l",
            str(self.base_dir / f"{name}.log"),
            "-w",
            "-t",
            "60",
            "start",
        )
        node.running = True

    def stop_node(
        self, name: str, mode: Literal["immediate", "fast", "smart"] = "immediate"
    ) -> None:
        node = self.nodes[name]
        self._server("pg_ctl", "-D", str(node.data_dir), "-m", mode, "-w", "stop")
        node.running = False

    def pause_replay(self, name: str) -> None:
        self.sql(name, "SELECT pg_wal_replay_pause()")

    def resume_replay(self, name: str) -> None:
        self.sql(name, "SELECT pg_wal_replay_resume()")

    def promote(self, name: str) -> None:
        self._server("pg_ctl", "-D", str(self.nodes[name].data_dir), "-w", "promote")
        old = self.primary
        old.role, self.nodes[name].role = "replica", "primary"

    def start_as_standby(self, name: str) -> None:
        """Start a stopped node (a former primary, say) in recovery, streaming from nobody
        until `follow` points it somewhere: its WAL stays where it stopped."""
        node = self.nodes[name]
        signal = node.data_dir / "standby.signal"
        signal.touch()
        if self._run_as is not None:
            shutil.chown(signal, self._run_as, self._run_as)
        node.role = "replica"
        self.start_node(name)

    def follow(self, replica: str, upstream: str) -> None:
        """Point `replica` at `upstream` (after a failover, say): it follows that server's
        timeline from then on (`recovery_target_timeline` is `latest` by default)."""
        port = self.nodes[upstream].port
        conninfo = f"host=127.0.0.1 port={port} user=postgres"
        self.sql(replica, f"ALTER SYSTEM SET primary_conninfo = {_literal(conninfo)}")
        self.sql(replica, "SELECT pg_reload_conf()")

    # -- queries and waiting -------------------------------------------------------------

    def sql(self, name: str, statement: str, *, database: str = "postgres") -> str:
        """Run one statement with psql as the superuser; returns unaligned output."""
        node = self.nodes[name]
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(node.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise DevClusterError(f"psql on {name} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_streaming(self, *, timeout: float = 60) -> None:
        """Until every running replica streams from the primary."""
        expected = sum(1 for node in self.replicas if node.running)
        query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
        self._wait(
            lambda: int(self.sql(self.primary.name, query)) >= expected,
            timeout,
            f"{expected} streaming replicas",
        )

    def wait_replayed(self, *, timeout: float = 30) -> None:
        """Until every running replica has replayed the primary's current WAL position."""
        # insert, not write, position: with synchronous_commit off a commit may not be written yet.
        lsn = self.sql(self.primary.name, "SELECT pg_current_wal_insert_lsn()")
        query = f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"
        for node in self.replicas:
            if node.running:
                self._wait(
                    lambda n=node.name: self.sql(n, query) == "t",
                    timeout,
                    f"{node.name} replaying {lsn}",
                )

    @staticmethod
    def _wait(condition: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():  # type: ignore[operator]
                    return
            except DevClusterError:
                pass
            if time.monotonic() > deadline:
                raise DevClusterError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.05)

    # -- addresses -----------------------------------------------------------------------

    def url(
        self, name: str = "primary", *, database: str = "postgres", user: str = "postgres"
    ) -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.nodes[name].port}/{database}"

    def create_role(self, role: str, *, createdb: bool = False) -> None:
        """An ordinary login role (row-level security applies to it), optionally CREATEDB."""
        exists = self.sql("primary", f"SELECT 1 FROM pg_roles WHERE rolname = {_literal(role)}")
        if not exists:
            create = "CREATEDB" if createdb else "NOCREATEDB"
            name = _identifier(role)
            self.sql("primary", f"CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS {create}")

    def create_database(self, database: str, *, owner: str) -> None:
        query = f"SELECT 1 FROM pg_database WHERE datname = {_literal(database)}"
        if not self.sql("primary", query):
            name, role = _identifier(database), _identifier(owner)
            self.sql("primary", f"CREATE DATABASE {name} OWNER {role}")

    # -- running server binaries ---------------------------------------------------------

    def _server(self, program: str, *args: str, check: bool = True) -> None:
        result = subprocess.run(
            [str(self.bindir / program), *args],
            capture_output=True,
            text=True,
            user=self._run_as,
            cwd=self.base_dir,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise DevClusterError(
                f"{program} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )
