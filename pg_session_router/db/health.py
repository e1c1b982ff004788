"""Server health: a circuit breaker per server, and the monitor that probes every server.

Health belongs to a *server* (host:port), not to a node: a tenant database on a shared cluster
is another node (another engine, another pool) on the same server, and must share its fate.
So every node holds the `ServerHealth` of its endpoint, and the monitor probes each endpoint
once per interval, whatever the request load and however many databases live there.

The monitor uses one dedicated asyncpg connection per server, never a pool connection, so
probing can neither starve requests nor be starved by them. Each probe is bounded by
`health.probe_timeout`, connect included.

Circuit breaker: a server that fails a probe, or a connection attempt in real traffic, is
ejected at once. The monitor's next probe after `retry_at` is the half-open trial: success
re-admits it. A server that flaps (is ejected again soon after re-admission) waits longer before
each trial, doubling up to `health.max_backoff`. Transitions are logged once each.

Replica lag in seconds: the server's own figure, the time since the last transaction it replayed
while it has received WAL it has not replayed, only measures how idle the primary was when that
WAL carries no commit (a checkpoint, a running-transactions record): a replica fully caught up
with every commit, caught between receiving such a record and replaying it, looked 100 s
behind after a quiet spell. So the monitor keeps its own clock of the writer's WAL positions
(where each recent probe found it): a replica that has replayed up to the position a probe
found is at most as stale as that probe is old. The smaller of the two bounds is the lag.

A replica follows the cluster's writer only if it is on the writer's timeline. After a
failover, a replica the new primary does not feed (its upstream was the old primary) replays
nothing more: no lag figure notices, since it received everything it was sent, and the new
primary's positions start where its own history forked, possibly below what the replica holds
from the old timeline (so a consistency token could wrongly count as replayed there). So when the
writer changes (another server, or a new timeline behind the same address), a replica serves
reads again only once it shows it follows: its received timeline is the writer's (visible to a
probe role with `pg_read_all_stats`), or, where that is hidden, it has replayed up to where the
new writer began writing (see `_follows`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from pg_session_router.core.errors import CredentialsError
from pg_session_router.core.settings import HealthSettings, RoutingSettings
from pg_session_router.core.storage import server_of
from pg_session_router.db.credentials import PasswordProvider
from pg_session_router.db.driver_errors import CREDENTIALS_SQLSTATES, describe_error, sqlstate
from pg_session_router.db.events import RouterObserver
from pg_session_router.db.tasks import cancel_and_wait, connect_direct, start_background

logger = logging.getLogger(__name__)

#: A server that stays admitted this long is forgiven its earlier ejections (backoff resets).
STABLE_AFTER_SECONDS = 30.0
#: A writer's WAL positions kept for the lag clock: probes, at one per `health.interval`. A
#: replica behind all of them falls back to the server's own figure.
POSITION_HISTORY = 600

#: A primary's position is its WAL write position, which a replica that replayed everything
#: reports too (the insert position may stand a page header further on after a quiet spell).
#: With synchronous_commit off, a commit may return up to three `wal_writer_delay` before its
#: record is written: the lag clock understates by at most that.
#: The timeline: a writer's from the name of its current WAL file; a replica's from its WAL
#: receiver (NULL when none is connected, and to a role without `pg_read_all_stats`).
#: Recovery is read once (a subquery with a volatile call is not flattened): a promotion
#: during the probe cannot give a replica's position with a primary's timeline.
PROBE_SQL = """
SELECT recovery AS in_recovery,
       pg_wal_lsn_diff(CASE WHEN recovery THEN pg_last_wal_replay_lsn()
                            ELSE pg_current_wal_lsn() END, '0/0')::bigint AS lsn,
       CASE WHEN recovery THEN pg_is_wal_replay_paused() ELSE false END AS paused,
       CASE WHEN recovery
                 AND pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn()
            THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
            ELSE 0.0 END AS lag_seconds,
       current_setting('server_version') AS server_version,
       CASE WHEN recovery THEN (SELECT received_tli FROM pg_stat_wal_receiver)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
            END AS timeline,
       pg_has_role('pg_read_all_stats', 'USAGE') AS sees_receiver
FROM (SELECT pg_is_in_recovery() AS recovery) AS server
"""


class RoutingEpoch:
    """Moves whenever a server's health changes in a way routing reads (`ROUTING_FIELDS`).

    Every read routes by the replicas that are up, fresh, not drained and in recovery; a
    cluster keeps that list until the epoch of its servers moves, instead of asking each
    node again on every read. One per monitor: all servers of a router share it."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


#: What a routing decision reads from `ServerHealth` (a node's role comes from `in_recovery`).
ROUTING_FIELDS = frozenset({"up", "fresh", "drained", "in_recovery", "timeline"})
_UNSET = object()


class ServerHealth:
    """What this process knows about one server, shared by every node on it."""

    def __init__(
        self,
        endpoint: str,
        url: URL,
        settings: HealthSettings,
        events: RouterObserver | None = None,
        epoch: RoutingEpoch | None = None,
    ) -> None:
        # First: setting any of ROUTING_FIELDS moves it.
        self.epoch = epoch if epoch is not None else RoutingEpoch()
        self.endpoint = endpoint
        self.events = events if events is not None else RouterObserver()
        self.url = url  # credentials for the probe connection; never logged
        #: The password's provider, when not in `url`.
        self.password: PasswordProvider | None = None
        #: Consecutive probes refused for the provider's password.
        self.refused_probes = 0
        self.settings = settings
        self.up = True
        self.since = time.time()
        self.reason: str | None = None
        self.retry_at = 0.0
        self.trips = 0
        self.admitted_at = time.monotonic()
        # From the last successful probe; None until the first one.
        self.in_recovery: bool | None = None
        self.lsn: int | None = None
        self.replay_paused = False
        self.lag_seconds: float | None = None
        self.lag_bytes: int | None = None
        #: A writer's: (monotonic time its probe was sent, the WAL position it found), oldest
        #: first; empty while the server is in recovery.
        self.positions: deque[tuple[float, int]] = deque(maxlen=POSITION_HISTORY)
        self.server_version: str | None = None
        #: A writer's timeline; a replica's received timeline (the last one seen while no
        #: receiver is connected), or None when the probe's role may not see it.
        self.timeline: int | None = None
        #: A writer's position when it was first seen writing on its timeline.
        self.writing_since: int | None = None
        #: Whether the last probe found it out of recovery (`in_recovery` is also set by a
        #: write refused as read-only, which must not restart the lag clock).
        self.probed_writing = False
        #: Whether the probe's role may see the WAL receiver's timeline (`pg_read_all_stats`).
        self.sees_receiver = False
        #: The writer (endpoint, timeline) this server was last known to follow; see
        #: `_follows`.
        self.following: tuple[str, int] | None = None
        #: Within `routing.max_replica_lag_*`; maintained by the monitor, read on every read.
        self.fresh = True
        self.last_probe_at: float | None = None
        self.probes = 0
        #: Nodes (engines) on this server; the monitor forgets a server when it reaches 0.
        self.nodes = 0
        #: Taken out of rotation by an operator (`router.drain`): no new session here.
        self.drained = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Every write of these fields goes through here (the monitor's, an ejection in real
        # traffic, a drain, a test's). What else routing reads (a node's configured role, its
        # health object, a cluster's nodes) is fixed when the cluster is built.
        if name in ROUTING_FIELDS and getattr(self, name, _UNSET) != value:
            object.__setattr__(self, name, value)
            self.epoch.value += 1
        else:
            object.__setattr__(self, name, value)

    def eject(self, reason: str) -> None:
        """Open the circuit now. Safe to call again while open (pushes the trial out)."""
        now = time.monotonic()
        if self.up:
            if now - self.admitted_at > STABLE_AFTER_SECONDS:
                self.trips = 0
            self.trips += 1
            self.up = False
            self.since = time.time()
            self.reason = reason
            logger.warning("ejected %s: %s", self.endpoint, reason)
            self.events.server_ejected(self.endpoint, reason)
        self.retry_at = now + self._backoff()

    def admit(self) -> None:
        """Close the circuit after a successful probe."""
        if self.up:
            return
        down_for = time.time() - self.since
        self.up = True
        self.since = time.time()
        self.reason = None
        self.admitted_at = time.monotonic()
        logger.warning("re-admitted %s after %.1fs", self.endpoint, down_for)
        self.events.server_admitted(self.endpoint)

    def staleness_bound(self, replayed: int, now: float) -> float | None:
        """A writer's: at most how many seconds behind it a follower that replayed up to
        `replayed` is. It has everything this writer had written when the newest probe that
        found a position at or below `replayed` was sent. None: behind every kept position."""
        for sent_at, position in reversed(self.positions):
            if position <= replayed:
                return max(0.0, now - sent_at)
        return None

    def probe_due(self, now: float) -> bool:
        return self.up or now >= self.retry_at

    def _backoff(self) -> float:
        # One interval before the first trial; doubling for a server that keeps flapping.
        return min(self.settings.interval * 2.0 ** (self.trips - 1), self.settings.max_backoff)

    def record_probe(self, row: Any, sent_at: float) -> None:
        """`sent_at`: when the probe was sent (monotonic), no later than the moment its WAL
        position was read."""
        self.probes += 1
        was_writing = self.probed_writing
        self.in_recovery = bool(row["in_recovery"])
        self.probed_writing = not self.in_recovery
        self.lsn = int(row["lsn"])
        self._record_timeline(row, was_writing)
        if not self.in_recovery:
            self.positions.append((sent_at, self.lsn))
        self.replay_paused = bool(row["paused"])
        self.server_version = str(row["server_version"])
        # NULL on a replica that has not replayed any commit yet: the seconds are unknown (the
        # byte lag still decides); never a TypeError that would abort the probe round.
        seconds = row["lag_seconds"]
        self.lag_seconds = (
            (float(seconds) if seconds is not None else None) if self.in_recovery else 0.0
        )
        if not self.in_recovery:
            self.lag_bytes = 0
        self.last_probe_at = time.time()

    def _record_timeline(self, row: Any, was_writing: bool) -> None:
        received = None if row["timeline"] is None else int(row["timeline"])
        self.sees_receiver = bool(row["sees_receiver"])
        if self.in_recovery:
            # A demoted server leads nobody with its old positions. Its timeline stays the last
            # one seen (its own as a writer, say) while no WAL receiver is connected: a
            # replica whose upstream died shows none.
            self.positions.clear()
            self.writing_since = None
            self.timeline = (received or self.timeline) if self.sees_receiver else None
        elif not was_writing or received != self.timeline:
            # Newly writing, or a new timeline behind the same address (another server's
            # history): the lag clock starts again.
            self.positions.clear()
            self.writing_since = self.lsn
            self.timeline = received

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "state": "up" if self.up else "ejected",
            "since": self.since,
            "reason": self.reason,
            "in_recovery": self.in_recovery,
            "replay_paused": self.replay_paused,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": self.lag_seconds,
            "server_version": self.server_version,
            "timeline": self.timeline,
            "fresh": self.fresh,
            "drained": self.drained,
            "last_probe_at": self.last_probe_at,
            "probes": self.probes,
        }


#: Consecutive probes a server may refuse a provider's password before it is ejected like any
#: failing server (a rotation takes a moment; a wrong secret is not a rotation).
MAX_REFUSED_PROBES = 5


def _credentials_in_rotation(server: ServerHealth, exc: Exception) -> bool:
    """A probe that failed on our side of a password rotation: the provider could not give a
    password (this process's problem, not the server's), or the server refused the one it
    gave a few times in a row. The server is up; sessions retry with the provider read again,
    where ejecting it would fail every request."""
    if server.password is None:
        return False
    if isinstance(exc, CredentialsError):
        logger.warning("%s: %s", server.endpoint, exc)
        return True
    if sqlstate(exc) in CREDENTIALS_SQLSTATES:
        server.refused_probes += 1
        logger.warning("%s: probe password refused (%d)", server.endpoint, server.refused_probes)
        return server.refused_probes <= MAX_REFUSED_PROBES
    return False


class HealthMonitor:
    """Owns every `ServerHealth` of a router and probes them in a background task."""

    def __init__(
        self,
        health: HealthSettings,
        routing: RoutingSettings,
        replica_groups: Callable[[], Iterable[tuple[ServerHealth, Iterable[ServerHealth]]]],
        events: RouterObserver | None = None,
    ) -> None:
        self.settings = health
        self.events = events if events is not None else RouterObserver()
        self.routing = routing
        # (primary-ish servers of a cluster, its replicas): lag is measured against the
        # cluster's current writer.
        self._replica_groups = replica_groups
        self.servers: dict[str, ServerHealth] = {}
        #: Shared by every server here: clusters re-read their readable replicas when it moves.
        self.epoch = RoutingEpoch()
        self._connections: dict[str, asyncpg.Connection] = {}
        #: Per cluster (its servers' endpoints): the first writer seen, see `_follows`.
        self._first_writers: dict[frozenset[str], tuple[str, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def server(self, url: URL, password: PasswordProvider | None = None) -> ServerHealth:
        """The health of `url`'s server, shared by every node on it (counted, see release)."""
        endpoint = server_of(url)  # nodes on one server share its health
        server = self.servers.get(endpoint)
        if server is None:
            server = self.servers[endpoint] = ServerHealth(
                endpoint, url, self.settings, self.events, self.epoch
            )
            server.password = password
        server.nodes += 1
        return server

    def release(self, server: ServerHealth) -> None:
        """A node on `server` is gone; the last one stops its probing."""
        server.nodes -= 1
        if server.nodes <= 0 and self.servers.get(server.endpoint) is server:
            del self.servers[server.endpoint]
            connection = self._connections.pop(server.endpoint, None)
            if connection is not None:
                connection.terminate()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Probe everything once (so roles and lag are known), then keep probing."""
        if self.running:
            return
        try:
            await self.probe_round()
        finally:
            # Also when the first round failed or was cancelled: sessions start the monitor
            # only when they bind a loop, which start() has done already.
            self.start_soon()

    def start_soon(self) -> None:
        """Start without waiting for a first round (first use by a script); needs a loop."""
        if not self.running:
            self._wake = asyncio.Event()  # bound to the running loop
            self._task = start_background(self._run(), "db-health-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.terminate()

    def wake(self) -> None:
        """Probe now instead of at the next interval (after a suspected topology change)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.probe_round()
            except Exception:  # never let one bad round kill the monitor
                logger.exception("health probe round failed")
            remaining = self.settings.interval - (time.monotonic() - started)
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
            self._wake.clear()

    # -- probing -------------------------------------------------------------------------

    async def probe_round(self) -> None:
        now = time.monotonic()
        due = [server for server in list(self.servers.values()) if server.probe_due(now)]
        await asyncio.gather(*(self._probe(server) for server in due))
        self._update_lag()
        self.events.probe_round()

    async def _probe(self, server: ServerHealth) -> None:
        # Any failure judges this server only: one server's odd error (asyncpg's own
        # InternalClientError on a connection the server just terminated, say) must not abort
        # the round for every other server.
        sent_at = time.monotonic()
        try:
            row = await self._query(server, reuse=True)
        except Exception:  # incl. timeouts
            # The kept connection may simply be stale (backend terminated, server restarted
            # since the last round): judge the server on a fresh connection, not on that.
            try:
                row = await self._query(server, reuse=False)
            except Exception as exc:
                if _credentials_in_rotation(server, exc):
                    return
                server.eject(f"probe failed: {describe_error(exc)}")
                return
        server.refused_probes = 0
        server.record_probe(row, sent_at)
        server.admit()

    async def _query(self, server: ServerHealth, *, reuse: bool) -> Any:
        timeout = self.settings.probe_timeout
        connection = self._connections.pop(server.endpoint, None)
        if connection is not None and (not reuse or connection.is_closed()):
            connection.terminate()
            connection = None
        if connection is None:
            connection = await connect_direct(
                server.url,
                connect_timeout=timeout,
                application_name="session-router:health",
                password=server.password,
            )
            connection.add_termination_listener(partial(self._probe_connection_lost, server))
        try:
            row = await connection.fetchrow(PROBE_SQL, timeout=timeout)
        except BaseException:
            connection.terminate()
            raise
        kept = self._connections.setdefault(server.endpoint, connection)
        if kept is not connection:
            # Two probe rounds overlapped (the background one and a direct call): keep one
            # connection per server, close the other rather than drop it unclosed.
            connection.terminate()
        return row

    def _probe_connection_lost(self, server: ServerHealth, connection: object) -> None:
        # The monitor pops its connection before closing it itself; one that is still kept
        # here was closed by the server: it crashed, restarted or is shutting down (or our
        # backend was terminated). Probe now rather than at the next interval, so a dead
        # server is ejected before traffic finds out.
        if self._connections.get(server.endpoint) is connection:
            del self._connections[server.endpoint]
            if self.running:
                self.wake()
        terminate = getattr(connection, "terminate", None)
        if terminate is not None:
            terminate()  # closed by the server already: this only releases what is left

    def _update_lag(self) -> None:
        now = time.monotonic()
        for writer, followers in self._replica_groups():
            replicas = list(followers)
            follows = self._follow_check(writer, replicas)
            for replica in replicas:
                if not replica.in_recovery:
                    replica.fresh = True
                    continue
                self._judge(replica, writer, follows(replica), now)

    def _follow_check(
        self, writer: ServerHealth, replicas: list[ServerHealth]
    ) -> Callable[[ServerHealth], bool]:
        """`_follows` for this writer's group (every replica follows a writer not probed yet:
        there is nothing to compare with)."""
        if writer.timeline is None:
            return lambda replica: True
        identity = (writer.endpoint, writer.timeline)
        # The first writer seen for these servers: the one a server first seen with it is
        # taken to follow (the monitor has no earlier writer to compare with).
        servers = frozenset((writer.endpoint, *(r.endpoint for r in replicas)))
        first_writer = self._first_writers.setdefault(servers, identity)
        # Another server up and out of recovery (a split brain): the old primary's WAL moves
        # its replicas' positions on too, so only a visible timeline tells who follows whom.
        split_brain = any(r.up and r.in_recovery is False for r in replicas)
        return partial(
            _follows,
            writer=writer,
            identity=identity,
            first_writer=first_writer,
            split_brain=split_brain,
        )

    def _judge(
        self, replica: ServerHealth, writer: ServerHealth, follows: bool, now: float
    ) -> None:
        """Set the replica's lag against the writer, and whether it gets reads (`fresh`)."""
        max_seconds = self.routing.max_replica_lag_seconds
        max_bytes = self.routing.max_replica_lag_bytes
        writer_lsn = writer.lsn if writer.up and writer.in_recovery is False else None
        if writer_lsn is not None and replica.lsn is not None:
            replica.lag_bytes = max(0, writer_lsn - replica.lsn)
            _bound_lag_seconds(replica, writer, now)
        too_far_seconds = max_seconds is not None and (replica.lag_seconds or 0.0) > max_seconds
        too_far_bytes = max_bytes is not None and (replica.lag_bytes or 0) > max_bytes
        fresh = follows and not (too_far_seconds or too_far_bytes)
        if fresh != replica.fresh:
            logger.warning(
                "%s %s reads (%s)",
                replica.endpoint,
                "resumes" if fresh else "stops receiving",
                f"lag {replica.lag_bytes} bytes, {replica.lag_seconds or 0.0:.1f}s"
                if follows
                else f"not following the writer on timeline {writer.timeline}",
            )
        replica.fresh = fresh


def _follows(
    replica: ServerHealth,
    *,
    writer: ServerHealth,
    identity: tuple[str, int],
    first_writer: tuple[str, int],
    split_brain: bool,
) -> bool:
    """Whether `replica` follows `writer`, whose (endpoint, timeline) is `identity` (see the
    module). Its timeline says so when the probe may see it. Else it follows the writer it
    followed at the last look, and a server first seen follows the cluster's first writer
    seen. Any other writer it follows once it has replayed up to where that writer began
    writing: WAL of an older timeline, held by a replica the writer does not feed, cannot
    reach that far unless the replica received more of it than the writer had (diverged)."""
    if replica.timeline is not None:
        follows = replica.timeline == writer.timeline
    elif replica.sees_receiver or split_brain:
        # A receiver never seen connected (the router started after its upstream died), or
        # positions that two writers move on: nothing shows which one it follows.
        follows = False
    elif replica.following == identity or (replica.following is None and identity == first_writer):
        follows = True
    else:
        follows = (
            replica.up
            and replica.lsn is not None
            and writer.writing_since is not None
            and replica.lsn >= writer.writing_since
        )
    if follows:
        replica.following = identity
    return follows


def _bound_lag_seconds(replica: ServerHealth, writer: ServerHealth, now: float) -> None:
    """The smaller of the replica's own figure and the writer's position clock (see the
    module), two bounds of how stale its reads are."""
    if replica.lag_bytes == 0:
        # Replayed all the primary had: the "seconds since the last replayed transaction"
        # figure only measures how idle the primary has been.
        replica.lag_seconds = 0.0
        return
    bound = writer.staleness_bound(replica.lsn or 0, now)
    if bound is not None and (replica.lag_seconds is None or bound < replica.lag_seconds):
        replica.lag_seconds = bound
