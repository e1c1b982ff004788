"""The unit of work: open a session on the routed node (with retry), then COMMIT or end it.

`SessionOpener.open_at_once` routes the common target without an await; `SessionOpener.open`
admits the tenant and routes the target (retrying while no node is eligible). Either hands
the session over unconnected: like a hand-written session, it checks out on its first
statement. A statement that finds its connection dead, or no connection to be had, is
replayed on a fresh one (`replay_statement`) while that cannot lose or repeat anything; a
write's first flush checks out first (`check_out_first`). `UnitOfWork` is the async context
manager around one session: on a clean exit a write COMMITs (and, when asked, reads its
consistency token), a read just ends; on an error the transaction is rolled back and driver
errors that mean something to the router become its own errors. The session is always closed,
also when the task is cancelled, so the connection goes back to its pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from tenacity import RetryError

from pg_session_router.core.errors import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseUnavailableError,
    EventLoopMismatchError,
    ReadOnlySessionError,
    TenantMovingError,
    TenantStorageMissingError,
    TopologyChangedError,
)
from pg_session_router.db.admission import TenantAdmission
from pg_session_router.db.cluster import Cluster
from pg_session_router.db.consistency import (
    REPLAYED_POSITION,
    ConsistencyToken,
    read_wal_position,
)
from pg_session_router.db.driver_errors import (
    READ_ONLY_SQLSTATE,
    TENANT_MOVED_SQLSTATE,
    UNDEFINED_TABLE_SQLSTATE,
    EjectedWhileWaitingError,
    describe_error,
    is_connect_failure,
    is_connect_refusal,
    is_connection_loss,
    server_refused,
    sqlstate,
)
from pg_session_router.db.events import Observers
from pg_session_router.db.health import HealthMonitor
from pg_session_router.db.retry import RetryPolicy
from pg_session_router.db.routed_session import RoutedSession
from pg_session_router.db.routing import Route, route_in_cluster
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import Placement

logger = logging.getLogger(__name__)

#: `SessionRouter.route`: the target, and the tenant's placement and cluster when known.
RouteFn = Callable[[Target, Placement | None, Cluster | None], Route]
T = TypeVar("T")


class SessionOpener:
    """Opens routed sessions and ends them; shared by every `UnitOfWork` of one router."""

    def __init__(
        self,
        route: RouteFn,
        admission: TenantAdmission,
        monitor: HealthMonitor,
        retry: RetryPolicy,
        events: Observers,
        *,
        max_wait_for_replica: float = 0.0,
    ) -> None:
        self._route = route
        self.events = events
        self.max_wait_for_replica = max_wait_for_replica
        self.admission = admission
        self.monitor = monitor
        self.retry = retry
        #: The event loop the pools belong to (set on first use, cleared by dispose).
        self.loop: asyncio.AbstractEventLoop | None = None

    def check_loop(self) -> None:
        """Bind to the running loop on first use; refuse any other loop afterwards."""
        loop = asyncio.get_running_loop()
        if loop is self.loop:
            return
        if self.loop is not None and not self.loop.is_closed():
            raise EventLoopMismatchError(
                "this router's connection pools belong to another event loop; use one router "
                "per event loop (in tests: a router per test, or dispose_router() after each)"
            )
        if self.loop is not None:
            raise EventLoopMismatchError(
                "this router was used on an event loop that is now closed, and its pools died "
                "with it; dispose it and build a new one (or use RouterProvider, which does)"
            )
        self.loop = loop

    def open_at_once(self, target: Target) -> tuple[AsyncSession, Route] | None:
        """The common open, without an await: no replica to wait on, no tenant or one ready
        to route to, on the loop already bound. A unit of work then opens without a single
        coroutine. None: `open()` does it (first use on a loop, a tenant to admit, a token to
        wait for, or no node eligible now, which `open()` retries)."""
        if target.after is not None or self.loop is not asyncio.get_running_loop():
            return None
        try:
            if target.tenant is None:
                return self._open_on(self._route(target, None, None))
            ready = self.admission.ready(target.tenant)
            if ready is not None and (target.read_only or not ready[0].writes_paused):
                return self._open_on(self._route(target, *ready))
        except Exception as exc:
            if not is_connect_failure(exc):
                raise
        return None

    async def open(self, target: Target, deadline_at: float | None) -> tuple[AsyncSession, Route]:
        if self.loop is not asyncio.get_running_loop():
            self.check_loop()
            # First use on this loop (a script that never called start(), or a router used
            # again after dispose()): the monitor runs from now until dispose() stops it.
            if not self.monitor.running:
                self.monitor.start_soon()
        # The deadline runs from the start of the unit of work, as in router.run (one rule).
        started = time.monotonic()
        try:  # the first attempt: no retry machinery allocated
            return await self._open_once(target)
        except Exception as exc:
            if not is_connect_failure(exc):
                raise
            self.events.retried("open", exc)
        deadline_at = deadline_at or started + self.retry.settings.deadline
        return await self.retry.call(
            lambda: self._open_once(target),
            is_connect_failure,
            deadline_at,
            "open a session",
            kind="open",
        )

    async def _open_once(self, target: Target) -> tuple[AsyncSession, Route]:
        placement = None
        if target.tenant is not None:
            placement = await self.admission.placement(target.tenant)
            if placement.writes_paused and not target.read_only:
                placement = await self.admission.writable_placement(target.tenant)
        route = self._route(target, placement, None)
        if route.reason != "consistency-token" or self.max_wait_for_replica <= 0:
            return self._open_on(route)
        # Counted before the first await: an idle tenant cluster may be evicted (its engines
        # disposed) by another task, and this session is about to check out a connection.
        self._count_in(route)
        try:
            waited = await self._wait_on_replica(route, target)
            if waited is None:
                return self._session_for(route), route
            # The session is on the replica it waited on: counted there from now on.
            route.node.in_flight -= 1
            waited[1].node.in_flight += 1
            return waited
        except BaseException:
            self._count_out(route)
            raise

    def _open_on(self, route: Route) -> tuple[AsyncSession, Route]:
        self._count_in(route)
        try:
            return self._session_for(route), route
        except BaseException:
            self._count_out(route)
            raise

    def _count_in(self, route: Route) -> None:
        # Counted from before the session checks out until the unit of work ends: an idle
        # tenant cluster is never evicted under a session, nor a drained server's pools
        # closed (a drain waits for its nodes' in_flight).
        route.cluster.in_flight += 1
        route.node.in_flight += 1

    def _count_out(self, route: Route) -> None:
        self.admission.end_flight(route.cluster)
        route.node.in_flight -= 1

    async def _wait_on_replica(
        self, route: Route, target: Target
    ) -> tuple[AsyncSession, Route] | None:
        """A read whose token no replica had replayed at the last probe: on a replica, watch
        its replay position for up to `routing.max_wait_for_replica`; the session is kept
        there once it has caught up (replay only moves forward, and every later statement
        takes a fresh snapshot). None: it did not catch up in time, or the replica failed;
        the primary serves the read. The caller counts the session in flight either way."""
        assert target.after is not None
        replicas = route.cluster.readable_replicas()
        if not replicas:
            return None
        node = route.cluster.policy.choose(replicas)
        waiting = Route(
            route.cluster, node, True, route.placement, "consistency-token-waited", route.min_lsn
        )
        session = None
        caught_up = False
        try:
            session = self._session_for(waiting)
            routed: RoutedSession = session.sync_session  # type: ignore[assignment]
            # While polling, a dead replica must end the wait, not be replayed elsewhere for
            # the whole retry deadline: the primary serves the read instead.
            routed.opaque = True
            caught_up = await _replayed_within(session, target.after.lsn, self.max_wait_for_replica)
            routed.opaque = False
            # The polls began a transaction: the caller's `session.begin()` takes it over.
            routed.adoptable_transaction = routed.get_transaction()
        except Exception as exc:  # the replica's trouble is the monitor's; the primary reads
            logger.debug("waiting on %s failed: %s", node.name, describe_error(exc))
        finally:
            if not caught_up and session is not None:  # also when cancelled: nothing leaks
                await _close_quietly(session)
        return (session, waiting) if caught_up and session is not None else None

    def _session_for(self, route: Route) -> AsyncSession:
        """A session bound to the route's node, not connected yet. It checks out on its first
        statement, like a hand-written one: a dead connection or node found there is handled
        by replaying that statement (any statement of a read; a write's first), and a write
        whose first contact with the server is a flush checks out just before it
        (`check_out_first`), where a node that cannot be reached is retried in the same way.
        An eager checkout would cost a greenlet hop per session."""
        session = route.node.factory(route.read_only)()
        routed: RoutedSession = session.sync_session  # type: ignore[assignment]
        placement = route.placement
        if placement is not None:
            routed.tenant_id = placement.tenant_id
            routed.connection_setup = placement.connection_setup
            routed.transaction_setup = placement.transaction_setup
        if route.node.behind_pooler:
            routed.per_transaction = True
        routed.route = route  # session.info's "node" and "route_reason" come from it
        routed.replay = self.replay_statement
        if not route.read_only:
            routed.first_checkout = self.check_out_first
        return session

    def check_out_first(self, session: RoutedSession) -> None:
        """Before a write's first flush (`add()`, then COMMIT or an explicit flush), when
        nothing has been sent: check out, so that a server that refuses or cannot be reached
        is retried (on another writer if the cluster has one) within `retry.deadline`, as a
        first statement's failure is. A failed connect leaves the transaction without a
        connection, so it is kept (a rollback would drop the caller's pending objects)."""

        def check_out() -> None:
            Session.connection(session)  # not session.connection(): that marks it opaque

        started = time.monotonic()
        try:
            check_out()
        except Exception as exc:
            if is_connect_refusal(exc):  # no connection was had: retried elsewhere or later
                self.replay_statement(session, check_out, exc, True, started, connected=False)
            elif is_connection_loss(exc):
                # Had, then lost while set up for its tenant: it is the transaction's now, and
                # ending that transaction here would undo the COMMIT that called us. Nothing of
                # the write was sent: a 503 that `router.run` may replay.
                raise ConnectionLostError(
                    f"lost the connection to {session.route.node.name} before anything was "
                    "sent; nothing was written"
                ) from exc
            else:
                raise

    def replay_statement(
        self,
        session: RoutedSession,
        again: Callable[[], T],
        error: Exception,
        clean: bool,
        started: float,
        *,
        connected: bool = True,
    ) -> T:
        """A statement failed because its connection died or could not be had. Nothing of the
        transaction can be lost when the unit of work only reads (at READ COMMITTED each
        statement sees a fresh snapshot anyway), or when this was a write's first statement
        (nothing reached the server, or the server rolled it back with the connection): run it
        again on a fresh connection, on the same node if it is up, else on the next eligible one
        that has replayed at least as far, within `retry.deadline` (see below for when it
        starts). Anything else is raised as it was. `connected=False`: no connection was had,
        so the transaction has none to discard. Runs inside SQLAlchemy's greenlet
        (`RoutedSession._execute_internal`)."""
        route: Route = session.route
        if not _replayable(session, route, error, clean):
            raise error
        # A socket error anywhere in the chain (refused, reset, unreachable): the server failed
        # us, not one stale connection; ejected at once so that the replay and everyone else
        # go elsewhere. (A narrower rule, ejecting only for errors raised while connecting,
        # was tried in session 20: the HTTP replica-kill test then answered 503s once, in a
        # loaded full run; the cause was not pinned down, so the rule with the longer record
        # stays.)
        if server_refused(error):
            route.node.health.eject(f"connect failed: {describe_error(error)}")
        self.monitor.wake()  # the server may be gone: have it probed now
        self.events.retried("replay", error)
        min_lsn = _replay_floor(route) if route.read_only else None
        # One rule with `open` and `router.run`: the deadline counts from the first attempt
        # to get a connection (a connect timeout fills it; connect errors come unwrapped); a
        # statement that ran and lost its connection gets the whole deadline from the loss.
        never_connected = is_connect_refusal(error) and not isinstance(
            error, DBAPIError | EjectedWhileWaitingError
        )
        since = started if never_connected else time.monotonic()
        deadline_at = since + self.retry.settings.deadline
        retrying = self.retry.retrying_in_greenlet(_connection_trouble, deadline_at, "replay")
        try:
            for attempt in retrying:
                with attempt:
                    result = _run_again(session, again, reroute(route, min_lsn), connected)
                    logger.info("replayed a statement on %s", session.route.node.name)
                    return result
        except RetryError as exc:
            last = exc.last_attempt.exception()
            # Keep the kind when the last attempt knew it (NoNodeAvailableError: none eligible).
            kind = type(last) if isinstance(last, DatabaseUnavailableError) else ConnectionLostError
            raise kind(
                f"{route.node.name} failed a statement ({describe_error(error)}) and no node "
                f"could take it within {self.retry.settings.deadline}s: {describe_error(last)}",
                last_error=last,
            ) from last
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def commit(self, session: AsyncSession, *, with_token: bool) -> None:
        """COMMIT (with `with_token`, then read the WAL position) and close, in one greenlet
        hop. Closing after a COMMIT does no I/O (the pool has nothing to roll back), so it
        needs no protection from cancellation and can share the hop."""
        step = _commit_position_close if with_token else _commit_close
        if not session.in_transaction():  # the caller committed already
            step = _position_close if with_token else _close
        try:
            lsn = await session.run_sync(step)
        except DatabaseUnavailableError:
            raise  # before anything was sent (a first checkout that found no node): not unknown
        except Exception as exc:
            # Where the COMMIT went: a write's first checkout, made in this hop, may have moved
            # the session to another writer (`replay_statement`).
            route: Route = session.sync_session.route  # type: ignore[attr-defined]
            if not is_connection_loss(exc):
                translated = self.translate(exc, route)
                if translated is exc:
                    raise
                raise translated from exc
            raise CommitOutcomeUnknownError(
                f"the connection to {route.node.name} was lost during COMMIT: the transaction "
                "may or may not have been applied, and is not retried automatically"
            ) from exc
        if lsn is not None:
            stream = session.sync_session.route.cluster.key.stream  # type: ignore[attr-defined]
            session.info["consistency_token"] = ConsistencyToken(stream, lsn)

    def translate(self, exc: Exception, route: Route) -> Exception:
        """Turn driver errors that mean something to the router into its own errors."""
        if sqlstate(exc) == READ_ONLY_SQLSTATE:
            if route.read_only:
                return ReadOnlySessionError(
                    f"write attempted in a read-only session on {route.node.name}; "
                    "declare the route or target with write intent"
                )
            # A primary that turned read-only: a failover. Stop writing there now, and have the
            # monitor look for the new primary at once instead of at the next interval.
            route.node.health.in_recovery = True
            self.monitor.wake()
            return TopologyChangedError(
                f"{route.node.name} is no longer a primary; nothing was written"
            )
        if is_connection_loss(exc):
            return ConnectionLostError(
                f"lost the connection to {route.node.name} mid-transaction; nothing was committed"
            )
        if isinstance(exc, PoolTimeoutError):  # sessions check out on their first statement
            return DatabaseUnavailableError(
                f"{route.node.name}: no pooled connection came free within pool.timeout"
            )
        if is_connect_refusal(exc):  # inside the caller's begin() block: not replayed
            return ConnectionLostError(
                f"could not connect to {route.node.name} ({describe_error(exc)}); nothing was sent"
            )
        if sqlstate(exc) == TENANT_MOVED_SQLSTATE:
            # A process that had not yet heard of a move wrote to the old storage: fenced.
            return TenantMovingError(f"{route.node.name}: the tenant has moved; nothing written")
        if route.placement is not None and sqlstate(exc) == UNDEFINED_TABLE_SQLSTATE:
            # A tenant's query names a table its storage lacks: not migrated (yet), an
            # operator's matter; the client may retry later.
            return TenantStorageMissingError(
                f"tenant {route.placement.tenant_id!r} on {route.node.name}: a table is "
                "missing (run the migrations for this tenant)"
            )
        return exc


class UnitOfWork:
    """`router.session()`: one unit of work on one node, as an async context manager.

    A class rather than an `@asynccontextmanager` generator: this is the hot path of every
    request, and a generator-based manager costs an async generator, its hooks and two extra
    frames per session. `commit_on_exit=False` gives SQLAlchemy's `async with maker() as s`
    meaning (the caller commits; what is left uncommitted is rolled back).
    """

    __slots__ = (
        "_commit_on_exit",
        "_deadline_at",
        "_opener",
        "_route",
        "_session",
        "_target",
        "_with_token",
    )

    def __init__(
        self,
        opener: SessionOpener,
        target: Target,
        *,
        deadline_at: float | None = None,
        with_token: bool = False,
        commit_on_exit: bool = True,
    ) -> None:
        self._opener = opener
        self._target = target
        self._deadline_at = deadline_at
        self._with_token = with_token
        self._commit_on_exit = commit_on_exit

    async def __aenter__(self) -> AsyncSession:
        # in_flight is counted from here (when the route is chosen) to the end of __aexit__.
        opener = self._opener
        try:
            opened = opener.open_at_once(self._target)
            if opened is None:
                opened = await opener.open(self._target, self._deadline_at)
        except Exception as exc:
            opener.events.open_failed(self._target, exc)
            raise
        session, self._route = opened
        self._session = session
        events = self._opener.events
        if events.active:
            events.session_opened(session.sync_session.info, self._route, self._target)
        return session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        # A replayed statement may have moved the session (same cluster, another node).
        route = self._route = self._session.sync_session.route  # type: ignore[attr-defined]
        error = exc
        try:
            if exc is not None:
                await self._end(exc)
            elif route.read_only:  # the common read, kept to one frame: nothing to commit
                session = self._session
                try:
                    # `_is_clean()` is private, but it is the check `Session.flush()` starts
                    # with: three truth tests, where the public new/dirty/deleted build sets
                    # (`dirty` scans the identity map) on every read.
                    if not session.sync_session._is_clean():
                        _refuse_unsaved_changes(session, route)
                finally:
                    await _close_ending(session, route)
            elif self._wants_commit():
                await self._commit()
            else:
                await self._end(None)
        except BaseException as failure:
            error = failure
            raise
        finally:
            # Where the session ended: a write's first checkout at COMMIT may have moved it
            # to another writer (`_rebind` moved its count there).
            route = self._session.sync_session.route  # type: ignore[attr-defined]
            opener = self._opener
            opener.admission.end_flight(route.cluster)
            route.node.in_flight -= 1
            if opener.events.active:
                opener.events.session_ended(self._session.sync_session.info, route, error)

    def _wants_commit(self) -> bool:
        # Without commit_on_exit, only a caller's own COMMIT counts (its token is still read).
        return self._commit_on_exit or not self._session.in_transaction()

    async def _commit(self) -> None:
        # The common write path: COMMIT and close share one greenlet hop. When that fails, the
        # session is closed like after any other error.
        session = self._session
        try:
            await self._opener.commit(session, with_token=self._with_token)
        except BaseException:
            await _close_shielded(session)
            raise

    async def _end(self, exc: BaseException | None) -> None:
        """A write the caller left uncommitted, or any unit of work that failed: no COMMIT."""
        session, route = self._session, self._route
        try:
            if exc is not None:
                await _rollback_quietly(session)
                if isinstance(exc, DBAPIError | OSError | PoolTimeoutError):
                    translated = self._opener.translate(exc, route)
                    if translated is not exc:
                        raise translated from exc
        finally:
            await _close_ending(session, route)


def _replay_floor(route: Route) -> int | None:
    """Where a replayed read may go: a node that has replayed at least as far as the dead one
    was known to have, and as the read's consistency token."""
    known = [lsn for lsn in (route.node.health.lsn, route.min_lsn) if lsn is not None]
    return max(known) if known else None


async def _replayed_within(session: AsyncSession, lsn: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        replayed = await session.scalar(REPLAYED_POSITION)
        if replayed is not None and replayed >= lsn:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_REPLAY_POLL_SECONDS)


#: Between two looks at a replica's replay position while a token read waits on it.
_REPLAY_POLL_SECONDS = 0.002


def _replayable(session: RoutedSession, route: Route, error: Exception, clean: bool) -> bool:
    """Replaying cannot lose or repeat anything: the connection died, or could not be had
    (refused, the server starting or shutting down, too many connections), and either the
    unit of work only reads at READ COMMITTED (each statement sees a fresh snapshot anyway),
    or nothing of this write was sent before this statement and nothing was pending."""
    if not (is_connection_loss(error) or is_connect_refusal(error)):
        return False
    if session.opaque:  # a connection used directly, or the caller's own begin() block
        return False
    if route.read_only:
        return True
    return clean and session.statements_run == 0


def _connection_trouble(exc: BaseException) -> bool:
    return is_connect_failure(exc) or is_connection_loss(exc)


def _run_again(session: RoutedSession, again: Callable[[], T], route: Route, connected: bool) -> T:
    """One replay attempt: the dead transaction ended, the session moved, the statement run."""
    if connected:
        _discard_transaction(session, read_only=route.read_only)
    _rebind(session, route)
    try:
        return again()
    except Exception as exc:
        if server_refused(exc):
            route.node.health.eject(f"connect failed: {describe_error(exc)}")
        raise


def reroute(route: Route, min_lsn: int | None) -> Route:
    """Where a replayed statement goes: the same cluster, the same intent; a read only where
    what the dead node had replayed has been replayed too."""
    cluster = route.cluster
    if not route.read_only:
        target = Target()
    elif route.node.role != "replica":
        target = Target(intent="read", use_primary=True)
    else:
        after = ConsistencyToken(cluster.key.stream, min_lsn) if min_lsn is not None else None
        target = Target(intent="read", after=after)
    return route_in_cluster(cluster, target, route.placement)


def _rebind(session: RoutedSession, route: Route) -> None:
    previous: Route | None = session.route
    if previous is not None:  # the session is counted on the node it is on
        previous.node.in_flight -= 1
    route.node.in_flight += 1
    session.bind = route.node.sync_engine(route.read_only)
    session.route = route
    session.info["node"] = route.node.name
    session.info["route_reason"] = route.reason


def _discard_transaction(session: Session, *, read_only: bool) -> None:
    # The dead connection was invalidated by SQLAlchemy; ending the transaction that held it
    # may fail on it again, which changes nothing. A read's transaction is closed without a
    # rollback's snapshot restore: objects the caller holds stay loaded (a rollback would
    # expire them all). A write here has nothing pending: a rollback is what it needs.
    try:
        transaction = session.get_transaction()
        if read_only and transaction is not None:
            transaction.close()
        else:
            session.rollback()
    except Exception:
        logger.debug("ending the transaction of a dead connection failed", exc_info=True)


def _close(session: Session) -> None:
    session.close()


def _commit_close(session: Session) -> None:
    session.commit()
    session.close()


def _commit_position_close(session: Session) -> int | None:
    # The position is read on the transaction's own connection between the COMMIT and its
    # return to the pool (see RoutedSession.position_connection): one round trip, no checkout.
    routed: RoutedSession = session  # type: ignore[assignment]
    routed.check_out_first()  # a write's first contact may be this checkout: retried there
    # Not session.connection(): that marks the session as used directly (no replay).
    routed.position_connection = Session.connection(session)
    try:
        session.commit()
    finally:
        routed.position_connection = None
    session.close()
    return routed.committed_position


def _position_close(session: Session) -> int | None:
    # The caller committed already: the position on a new connection, in autocommit (no BEGIN
    # or COMMIT round trips). Failing to read it must not turn a committed write into an error.
    try:
        connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        position: int | None = read_wal_position(connection)
    except Exception:
        logger.warning("no consistency token after a committed write", exc_info=True)
        position = None
    session.close()
    return position


def _refuse_unsaved_changes(session: AsyncSession, route: Route) -> None:
    """A read session ends without COMMIT; refuse to drop ORM changes silently. Called when
    `_is_clean()` says it may have some (a test pins the behaviour: `test_session.py`,
    unsaved changes in a read session)."""
    if session.new or session.dirty or session.deleted:
        raise ReadOnlySessionError(
            f"a read-only session on {route.node.name} has unsaved changes; "
            "declare the route or target with write intent"
        )


async def _rollback_quietly(session: AsyncSession) -> None:
    # The original error matters more than a failed rollback on a dead connection; close()
    # invalidates such a connection anyway.
    try:
        await session.rollback()
    except (DBAPIError, OSError):
        logger.debug("rollback failed after an error", exc_info=True)


async def _close_shielded(session: AsyncSession) -> None:
    # close() may do I/O (a ROLLBACK). Shielded, it runs to completion in its own task even when
    # the request's task is cancelled meanwhile, so the connection still goes back to its pool
    # (what AsyncSession.__aexit__ does, without calling a dunder of someone else's class).
    await asyncio.shield(session.close())


async def _close_ending(session: AsyncSession, route: Route) -> None:
    """Close after work that ends without COMMIT. If the connection died after the last
    statement, the ROLLBACK that close() sends fails: nothing was written, and a read has its
    rows already, so the dead connection is discarded (SQLAlchemy invalidates it) and the unit
    of work ends as it would have (a read that succeeded stays a success)."""
    # Not `_close_shielded`: `asyncio.shield()` runs the close in a task of its own, about a
    # tenth of a read's CPU, on every read. Closed in this task instead, a cancellation that
    # lands mid-ROLLBACK is thrown into SQLAlchemy's reset, which invalidates the connection
    # and returns its slot to the pool (SQLAlchemy 2.0.56 and 2.1.6 on, sqlalchemy#13699: the
    # versions pyproject allows). What the interrupted close did not get to (the session's
    # own state) is finished under a shield before the cancellation goes on.
    try:
        # One loop turn first, as SQLAlchemy's own `async with` gets by running the close in a
        # task. Sent in the same turn as the last statement's answer, the ROLLBACK reaches a
        # server backend that is just going to sleep: on a host the client shares with it
        # (loopback, a pooler beside the app) the send then spins in the kernel until that
        # backend is switched out, to wake it at once. At concurrency 16 that was a read's
        # whole remaining cost against the hand-written session: +11 us of system CPU per
        # read (user CPU at parity); with the turn, none (README, "Benchmarks"). Not when a
        # cancellation is pending: it would land on this turn, before the close began.
        task = asyncio.current_task()
        if task is None or not task.cancelling():
            await asyncio.sleep(0)
        await session.close()
    except asyncio.CancelledError:
        try:
            await _close_shielded(session)
        except Exception:
            logger.debug("finishing a close interrupted by cancellation failed", exc_info=True)
        raise
    except Exception as exc:
        if not is_connection_loss(exc):
            raise
        logger.info("connection to %s lost while ending a unit of work", route.node.name)


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await _close_shielded(session)
    except (DBAPIError, OSError):
        logger.debug("close failed after a connect error", exc_info=True)
