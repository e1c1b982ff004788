"""Real faults on loopback, and a steady read load to inflict them on.

Used by the failover tests and by `bench/failover.py`; nothing here mocks the database.

- `BlackholeServer`: accepts TCP connections and never says a word (a hung server, a
  half-open firewall): connecting must time out, not hang.
- `CommitCutter`: a TCP proxy in front of a real server that, once armed, forwards the client's
  COMMIT and then cuts the connection before the answer comes back: the outcome is unknown.
- `Partition`: loopback packets to and from one port dropped by the kernel's firewall
  (iptables): a real cut without a FIN, where nothing is acknowledged any more (behind
  `SilentCut` the relay's kernel still acknowledges what it swallows).
- `ReadLoad`: N tasks reading until stopped (through `router.run`, or with `replay=False`
  through plain `router.session` units of work, as `get_db` reads), counting failures and
  which server answered each read.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text

from pg_session_router.db.router import SessionRouter


async def eventually(
    condition: Callable[[], Awaitable[bool] | bool], *, within: float, what: str
) -> float:
    """Wait until `condition()` holds; return the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


class BlackholeServer:
    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> BlackholeServer:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):  # swallow the startup packet, answer nothing
            pass

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in self._writers:
            writer.transport.abort()
        assert self._server is not None
        self._server.close()


class CommitCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.armed = False
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CommitCutter:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        def cut() -> None:
            client_w.transport.abort()
            server_w.close()

        async def client_to_server() -> None:
            while data := await client_r.read(65536):
                server_w.write(data)
                if self.armed and b"COMMIT" in data:
                    # The COMMIT is on its way to the server; the answer will never return.
                    self.cuts += 1
                    cut()
                    return
                await server_w.drain()
            cut()

        async def server_to_client() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
            cut()

        for pump in (client_to_server(), server_to_client()):
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class SilentCut:
    """A loopback relay whose connections can be cut without a FIN: after `cut()`, those it
    relays go silent both ways (nothing forwarded, nothing closed), as when a NAT or firewall
    drops an idle mapping; connections made afterwards are relayed normally."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._generation = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SilentCut:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for writer in self._writers:
            writer.transport.abort()

    def cut(self) -> None:
        self._generation += 1

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, server_w]
        generation = self._generation

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if generation != self._generation:
                    continue  # cut: swallowed, never answered, never closed
                sink.write(data)
                await sink.drain()
            if generation == self._generation:
                sink.close()  # an orderly end, passed on (a cut one never is)

        for task in (
            asyncio.create_task(pump(client_r, server_w)),
            asyncio.create_task(pump(server_r, client_w)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class Partition:
    """Drops every loopback packet to or from `port` once `cut()` (iptables, as root): the
    peers stop hearing each other, and nobody closes anything. `heal()` (also on exit) lifts
    it. Used with a relay in front of a real server, so that only the test's own connections
    are cut off. Its rules carry a tag: rules for the same port left by a run that was killed
    are removed first (a relay may get that port again)."""

    TAG = "pg-session-router-tests"

    def __init__(self, port: int) -> None:
        if shutil.which("iptables") is None:
            raise RuntimeError("the partition tests need iptables (the README's test command)")
        tagged = ["-m", "comment", "--comment", self.TAG, "-j", "DROP"]
        self._rules = [
            ["INPUT", "-p", "tcp", direction, str(port), *tagged]
            for direction in ("--dport", "--sport")
        ]
        self._inserted: list[list[str]] = []
        for rule in self._rules:  # stale ones: each delete removes one copy
            while _iptables("-D", rule, check=False) == 0:
                pass

    def cut(self) -> None:
        for rule in self._rules:
            _iptables("-I", rule)
            self._inserted.append(rule)

    def heal(self) -> None:
        while self._inserted:
            _iptables("-D", self._inserted.pop(), check=False)

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal()


def _iptables(action: str, rule: list[str], *, check: bool = True) -> int:
    # -w: wait for the xtables lock rather than fail when another process holds it.
    done = subprocess.run(["iptables", "-w", "5", action, *rule], check=check, capture_output=True)
    return done.returncode


WHO_ANSWERS = text("SELECT inet_server_port()")


class ReadLoad:
    def __init__(
        self,
        router: SessionRouter,
        *,
        tasks: int = 20,
        target: str = "replica",
        replay: bool = True,
    ) -> None:
        """`tasks` readers in a loop; through `router.run` (which replays a read that failed
        midway), or with `replay=False` through plain `router.session`, as `get_db` reads."""
        self.router = router
        self.tasks = tasks
        self.target = target
        self.replay = replay
        self.ports: Counter[int] = Counter()
        self.recent: deque[tuple[float, int]] = deque(maxlen=1000)
        self.failures: list[BaseException] = []
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []

    async def _read(self, session: Any) -> int:
        return int(await session.scalar(WHO_ANSWERS))

    async def _work(self) -> None:
        while not self._stopping:
            try:
                port = await self._read_once()
            except Exception as exc:  # every failure is what the test counts
                self.failures.append(exc)
            else:
                self.ports[port] += 1
                self.recent.append((time.monotonic(), port))
            await asyncio.sleep(0.002)

    async def _read_once(self) -> int:
        if self.replay:
            return await self.router.run(self._read, self.target)
        async with self.router.session(self.target) as session:
            return await self._read(session)

    def served_by(self, port: int, *, after: float) -> bool:
        return any(at >= after and p == port for at, p in self.recent)

    async def __aenter__(self) -> ReadLoad:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.tasks)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping = True
        await asyncio.gather(*self._workers)

    @property
    def total(self) -> int:
        return sum(self.ports.values())
