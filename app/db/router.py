"""`SessionRouter`: named clusters and nodes, target -> node, and the session lifecycle.

One router per process holds every engine. `router.session(target)` resolves the target to a
node (attribute reads, no I/O), opens an `AsyncSession` bound to that node for the whole unit of
work, checks out a live connection (retrying on the next eligible node while that is safe),
and on exit commits, or rolls back on error. `router.run(fn, target)` also replays a unit of
work that failed midway, when replaying is safe (read-only work, or a write that provably never
reached COMMIT).

Binding a whole session to one node, instead of routing statement by statement through
`get_bind`, is deliberate: a unit of work that reads then writes must see its own writes, and
bulk writes must never be sent to a replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from tenacity import RetryError

from app.core.config import (
    ClusterSettings,
    DatabaseSettings,
    PoolSettings,
    Settings,
    check_database_settings,
    load_settings,
)
from app.db.cluster import Cluster, Node, RoutedSession
from app.db.consistency import WAL_POSITION, ConsistencyToken, stream_of
from app.db.errors import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseUnavailableError,
    NoNodeAvailableError,
    ReadOnlySessionError,
    TargetError,
    TopologyChangedError,
)
from app.db.health import HealthMonitor, ServerHealth
from app.db.retry import (
    NO_EJECT_SQLSTATES,
    RetryPolicy,
    describe_error,
    error_chain,
    is_connect_failure,
    is_connection_loss,
    is_read_retryable,
    is_write_retryable,
    sqlstate,
)
from app.db.targets import Target
from app.db.tenancy import Placement, TenantCatalog, TenantRegistry
from app.db.tenant_clusters import TenantClusterCache

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction
# A server that refuses us at connect time (as opposed to a pooled connection that went stale).
_REFUSED_SQLSTATES = frozenset({"57P03", "08001", "08004"})


@dataclass(frozen=True, slots=True)
class Route:
    """The outcome of routing one target: which node, in which mode, for which tenant."""

    cluster: Cluster
    node: Node
    read_only: bool
    placement: Placement | None


class SessionRouter:
    """Holds the clusters of one process and hands out sessions bound to the right node."""

    def __init__(self, settings: DatabaseSettings) -> None:
        check_database_settings(settings)
        self.settings = settings
        self.monitor = HealthMonitor(settings.health, settings.routing, self._replica_groups)
        self.retry_policy = RetryPolicy(settings.retry)
        self._configured = frozenset(settings.clusters)
        self._clusters: dict[str, Cluster] = {}
        self._nodes: dict[str, Node] = {}
        for name, cluster in settings.clusters.items():
            self._add_cluster(name, self._build_cluster(name, cluster))
        self.default_cluster = self._clusters[settings.default_cluster]
        catalog = TenantCatalog(lambda: self.default_cluster.primary.engine)
        self.tenants = TenantRegistry(
            settings.tenants,
            settings.default_cluster,
            settings=settings.tenancy,
            catalog=catalog if settings.tenancy.catalog else None,
        )
        self.tenant_clusters = TenantClusterCache(
            self._build_tenant_cluster,
            max_engines=settings.tenancy.max_engines,
            wait_timeout=settings.tenancy.pool.timeout,
            on_evict=self._forget_cluster,
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SessionRouter:
        return cls((settings or load_settings()).database)

    # -- clusters and nodes --------------------------------------------------------------

    def _build_cluster(
        self,
        key: str,
        settings: ClusterSettings,
        database: str | None = None,
        pool: PoolSettings | None = None,
    ) -> Cluster:
        return Cluster.from_settings(
            key,
            settings,
            monitor=self.monitor,
            routing=self.settings.routing,
            connect_timeout=self.settings.connect_timeout,
            database=database,
            pool=pool,
        )

    def _add_cluster(self, key: str, cluster: Cluster) -> Cluster:
        self._clusters[key] = cluster
        self._nodes.update((node.name, node) for node in cluster.nodes)
        return cluster

    def _forget_cluster(self, cluster: Cluster) -> None:
        """An evicted tenant cluster: unreachable by name, its servers released."""
        if self._clusters.get(cluster.name) is cluster:
            del self._clusters[cluster.name]
        for node in cluster.nodes:
            if self._nodes.get(node.name) is node:
                del self._nodes[node.name]
            self.monitor.release(node.health)

    @property
    def clusters(self) -> dict[str, Cluster]:
        return dict(self._clusters)

    def cluster(self, key: str) -> Cluster:
        """A configured cluster, or a tenant's database cluster, built on first use."""
        cluster = self._clusters.get(key)
        if cluster is None:
            cluster = self._add_cluster(key, self.tenant_clusters.build_now(key))
        elif key in self.tenant_clusters:
            self.tenant_clusters.touch(key)
        return cluster

    async def close_tenant_cluster(self, key: str) -> None:
        """Dispose a tenant cluster's engines now, if it has any (built again on next use)."""
        cluster = self._clusters.get(key)
        if cluster is not None and key in self.tenant_clusters:
            await self.tenant_clusters.evict(cluster)

    async def _admit_tenant_cluster(self, key: str) -> None:
        """A tenant cluster that is missing (or being drained): built within the engine budget,
        waiting for room when needed."""
        if "@" not in key:
            self.cluster(key)  # a configured cluster name: raises TargetError if unknown
            return
        self._add_cluster(key, await self.tenant_clusters.acquire(key))

    def _build_tenant_cluster(self, key: str) -> Cluster:
        base, sep, database = key.partition("@")
        if not sep or (base and base not in self._configured):
            raise TargetError(f"no cluster named {key!r}")
        pool = self.settings.tenancy.pool
        if not base:  # "@tenant": the tenant's own server, from its url
            tenant = self.tenants.settings_of(database)
            own = self.settings.clusters[self.settings.default_cluster].model_copy(
                update={"primary": tenant.url, "replicas": [], "nodes": []}
            )
            return self._build_cluster(key, own, pool=pool)
        return self._build_cluster(key, self.settings.clusters[base], database, pool=pool)

    def node(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            raise TargetError(f"no node named {name!r}; known: {', '.join(sorted(self._nodes))}")
        return node

    def _replica_groups(self) -> Iterator[tuple[ServerHealth, list[ServerHealth]]]:
        """For lag: each configured cluster's writer and the servers that follow it."""
        for name in self._configured:
            cluster = self._clusters[name]
            writer = cluster.writer()
            if writer is not None:
                yield writer.health, [n.health for n in cluster.nodes if n is not writer]

    # -- routing -------------------------------------------------------------------------

    def route(self, target: Target, placement: Placement | None = None) -> Route:
        """Target -> node. `placement`: the tenant's, when the caller has resolved it already."""
        if target.tenant is not None:
            if target.node is not None or target.cluster is not None:
                raise TargetError("a tenant target picks its own cluster; do not name one")
            placement = placement or self.tenants.placement(target.tenant)
            cluster = self.cluster(placement.cluster_key)
        elif target.node is not None:
            explicit = self.node(target.node)
            owner = self._clusters[explicit.name.rpartition(".")[0]]  # "<cluster>.<node>"
            return Route(owner, explicit, target.read_only, None)
        elif target.cluster is not None:
            cluster = self.cluster(target.cluster)
        else:
            cluster = self.default_cluster
        if target.read_only and not target.use_primary:
            node = cluster.reader(self._min_lsn(cluster, target))
        else:
            node = cluster.writer()
        if node is None:
            raise NoNodeAvailableError(_why_unavailable(cluster, target))
        return Route(cluster, node, target.read_only, placement)

    @staticmethod
    def _min_lsn(cluster: Cluster, target: Target) -> int | None:
        # A token of another WAL stream says nothing about this cluster's replicas.
        token = target.after
        if token is None or token.stream != stream_of(cluster.name):
            return None
        return token.lsn

    async def consistency_token(self, cluster: Cluster) -> ConsistencyToken:
        """The WAL position a read must wait for to see what has been committed so far.

        One statement in autocommit mode on the writer (no BEGIN/COMMIT round trips)."""
        writer = cluster.writer()
        if writer is None:
            raise NoNodeAvailableError(_why_unavailable(cluster, Target(cluster=cluster.name)))
        async with writer.session_factory() as session:
            lsn = await session.run_sync(_wal_position)
        return ConsistencyToken(stream_of(cluster.name), lsn)

    # -- sessions ------------------------------------------------------------------------

    def session(
        self,
        target: Target | str | None = None,
        *,
        tenant: str | None = None,
        read_only: bool = False,
        consistency_token: bool = False,
    ) -> AbstractAsyncContextManager[AsyncSession]:
        """A session bound to one node: commits on success, rolls back on error, always closes.

        With `consistency_token`, a committed write leaves its read-your-writes token in
        `session.info["consistency_token"]` (one query after the COMMIT, on the same session).
        """
        resolved = Target.coerce(target, tenant=tenant, read_only=read_only)
        return _UnitOfWork(self, resolved, None, consistency_token)

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        target: Target | str | None = None,
        *,
        tenant: str | None = None,
        read_only: bool = False,
    ) -> T:
        """Run `work(session)` in a unit of work, replaying it with a fresh session (on another
        node when there is one) after a failure where replaying is safe: any failure for
        read-only work; for writes, only failures that prove nothing was committed. `work` may
        run more than once, so it should have no effects outside the database.
        """
        resolved = Target.coerce(target, tenant=tenant, read_only=read_only)
        safe = is_read_retryable if resolved.read_only else is_write_retryable
        deadline_at = self.retry_policy.deadline_at()

        async def attempt_once() -> T:
            async with _UnitOfWork(self, resolved, deadline_at, False) as session:
                return await work(session)

        try:
            return await attempt_once()
        except Exception as exc:
            if not safe(exc):
                raise
            logger.info("replaying a unit of work after %s", type(exc).__name__)
        return await self._retry(attempt_once, safe, deadline_at, "run the unit of work")

    async def _open(self, target: Target, deadline_at: float | None) -> tuple[AsyncSession, Route]:
        if not self.monitor.running:
            self.monitor.start_soon()
        try:  # the common case: first attempt, no retry machinery allocated
            return await self._open_once(target)
        except Exception as exc:
            if not is_connect_failure(exc):
                raise
        return await self._retry(
            lambda: self._open_once(target),
            is_connect_failure,
            deadline_at or self.retry_policy.deadline_at(),
            "open a session",
        )

    async def _retry(
        self,
        attempt_once: Callable[[], Awaitable[T]],
        predicate: Callable[[BaseException], bool],
        deadline_at: float,
        what: str,
    ) -> T:
        try:
            async for attempt in self.retry_policy.retrying(predicate, deadline_at):
                with attempt:
                    return await attempt_once()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            raise DatabaseUnavailableError(
                f"could not {what} within {self.settings.retry.deadline}s: {describe_error(last)}",
                last_error=last,
            ) from last
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _open_once(self, target: Target) -> tuple[AsyncSession, Route]:
        placement = None
        if target.tenant is not None:
            # Async only on a miss: an unknown id may need the catalog, a new database tenant
            # may need to wait for room among the tenant engines.
            placement = self.tenants.cached(target.tenant)
            if placement is None:
                placement = await self.tenants.resolve(target.tenant)
            cluster = self._clusters.get(placement.cluster_key)
            if cluster is None or cluster.draining:
                await self._admit_tenant_cluster(placement.cluster_key)
        route = self.route(target, placement)
        # Counted before the first await: an idle tenant cluster may be evicted (its engines
        # disposed) by another task, and this session is about to check out a connection.
        route.cluster.in_flight += 1
        try:
            return await self._connect(route)
        except BaseException:
            self._end_flight(route.cluster)
            raise

    def _end_flight(self, cluster: Cluster) -> None:
        cluster.in_flight -= 1
        if cluster.in_flight == 0:
            self.tenant_clusters.became_idle(cluster)

    async def _connect(self, route: Route) -> tuple[AsyncSession, Route]:
        session = route.node.factory(route.read_only)()
        if route.placement is not None:
            routed: RoutedSession = session.sync_session  # type: ignore[assignment]
            routed.tenant_id = route.placement.tenant_id
            routed.transaction_setup = route.placement.transaction_setup
        try:
            # Checks out a connection (the pool discards ones the server closed) and runs the
            # tenant setup, so a dead node shows up here, where retrying is always safe. This
            # greenlet hop is most of what a read costs over a hand-written session; skipping
            # it when the pool looks warm was tried and let a crash reach the caller's first
            # statement (README, "Benchmarks").
            await session.run_sync(_check_out)
        except BaseException as exc:
            await _close_quietly(session)
            if isinstance(exc, Exception) and _server_refused(exc):
                route.node.health.eject(f"connect failed: {describe_error(exc)}")
            raise
        return session, route

    async def _commit(self, session: AsyncSession, route: Route, *, with_token: bool) -> None:
        """COMMIT (with `with_token`, then read the WAL position) and close, in one greenlet
        hop. Closing after a COMMIT does no I/O (the pool has nothing to roll back), so it
        needs no protection from cancellation and can share the hop."""
        step = _commit_position_close if with_token else _commit_close
        if not session.in_transaction():  # the caller committed already
            step = _position_close if with_token else _close
        try:
            lsn = await session.run_sync(step)
        except Exception as exc:
            if not is_connection_loss(exc):
                translated = self._translate(exc, route)
                if translated is exc:
                    raise
                raise translated from exc
            raise CommitOutcomeUnknownError(
                f"the connection to {route.node.name} was lost during COMMIT: the transaction "
                "may or may not have been applied, and is not retried automatically"
            ) from exc
        if lsn is not None:
            token = ConsistencyToken(stream_of(route.cluster.name), lsn)
            session.info["consistency_token"] = token

    def _translate(self, exc: Exception, route: Route) -> Exception:
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
        return exc

    # -- lifecycle and introspection -----------------------------------------------------

    async def start(self) -> None:
        """Probe every server once, then keep probing in the background."""
        await self.monitor.start()

    def status(self) -> dict[str, Any]:
        nodes = {
            name: {
                "role": node.role,
                "configured_role": node.configured_role,
                "weight": node.weight,
                **node.health.snapshot(),
                "pool": node.pool_status(),
            }
            for name, node in sorted(self._nodes.items())
        }
        catalog = self.tenants.catalog
        return {
            "default_cluster": self.default_cluster.name,
            "monitor_running": self.monitor.running,
            "health_interval": self.settings.health.interval,
            "nodes": nodes,
            "tenancy": {
                "tenants": len(self.tenants),
                "tenant_clusters": len(self.tenant_clusters),
                "tenant_engines": self.tenant_clusters.engines,
                "max_engines": self.tenant_clusters.max_engines,
                "catalog_loads": catalog.loads if catalog is not None else None,
            },
        }

    async def dispose(self) -> None:
        """Stop the monitor and close every pool. Using the router again restarts both."""
        await self.monitor.stop()
        await self.tenants.close()
        await self.tenant_clusters.close()
        for cluster in list(self._clusters.values()):
            await cluster.dispose()

    def __repr__(self) -> str:
        return f"<SessionRouter clusters={sorted(self._clusters)} tenants={len(self.tenants)}>"


class _UnitOfWork:
    """`router.session()`: one unit of work on one node, as an async context manager.

    A class rather than an `@asynccontextmanager` generator: this is the hot path of every
    request, and a generator-based manager costs an async generator, its hooks and two extra
    frames per session.
    """

    __slots__ = ("_deadline_at", "_route", "_router", "_session", "_target", "_with_token")

    def __init__(
        self, router: SessionRouter, target: Target, deadline_at: float | None, with_token: bool
    ) -> None:
        self._router = router
        self._target = target
        self._deadline_at = deadline_at
        self._with_token = with_token

    async def __aenter__(self) -> AsyncSession:
        # in_flight is counted from here (when the route is chosen) to the end of __aexit__.
        self._session, self._route = await self._router._open(self._target, self._deadline_at)
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        try:
            if exc is None and not self._route.read_only:
                await self._commit()
            else:
                await self._end(exc_type, exc, tb)
        finally:
            self._router._end_flight(self._route.cluster)

    async def _commit(self) -> None:
        # The common write path: COMMIT and close share one greenlet hop. When that fails, the
        # session is closed like after any other error.
        session = self._session
        try:
            await self._router._commit(session, self._route, with_token=self._with_token)
        except BaseException as error:
            await session.__aexit__(type(error), error, error.__traceback__)
            raise

    async def _end(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        """A read that succeeded, or any unit of work that failed: no COMMIT."""
        session, route = self._session, self._route
        try:
            if exc is None:
                _check_nothing_pending(session, route)  # then close() rolls back
            else:
                await _rollback_quietly(session)
                if isinstance(exc, DBAPIError):
                    translated = self._router._translate(exc, route)
                    if translated is not exc:
                        raise translated from exc
        finally:
            # AsyncSession.__aexit__ runs close() to completion even when the task is
            # cancelled, so a cancelled request still returns its connection to the pool.
            await session.__aexit__(exc_type, exc, tb)


def _check_out(session: Session) -> None:
    # Through run_sync: one greenlet hop, without building an AsyncConnection proxy.
    session.connection()


def _close(session: Session) -> None:
    session.close()


def _commit_close(session: Session) -> None:
    session.commit()
    session.close()


def _commit_position_close(session: Session) -> int | None:
    # The position is read on the transaction's own connection between the COMMIT and its
    # return to the pool (see RoutedSession.position_connection): one round trip, no checkout.
    routed: RoutedSession = session  # type: ignore[assignment]
    routed.position_connection = session.connection()
    try:
        session.commit()
    finally:
        routed.position_connection = None
    session.close()
    return routed.committed_position


def _position_close(session: Session) -> int | None:
    position = _position_after_commit(session)
    session.close()
    return position


def _wal_position(session: Session) -> int:
    """The primary's WAL position: one statement on a new autocommit transaction (no BEGIN or
    COMMIT round trips)."""
    connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return int(connection.scalar(WAL_POSITION))


def _position_after_commit(session: Session) -> int | None:
    # After a successful COMMIT, failing to read the position must not turn a committed write
    # into an error: log it and give no token.
    try:
        return _wal_position(session)
    except Exception:
        logger.warning("no consistency token after a committed write", exc_info=True)
        return None


def _check_nothing_pending(session: AsyncSession, route: Route) -> None:
    """A read session ends without COMMIT; refuse to drop ORM changes silently."""
    # `_is_clean()` is the check Session.flush() itself starts with: three truth tests, where
    # `new`/`dirty`/`deleted` build sets. Only a session that may have changes pays for those.
    if session.sync_session._is_clean():
        return
    if session.new or session.dirty or session.deleted:
        raise ReadOnlySessionError(
            f"a read-only session on {route.node.name} has unsaved changes; "
            "declare the route or target with write intent"
        )


def _why_unavailable(cluster: Cluster, target: Target) -> str:
    if not target.read_only or target.use_primary:
        wanted = "writable primary"
    elif cluster.fallback_to_primary:
        wanted = "fresh replica or primary"
    else:
        wanted = "fresh replica (routing.fallback_to_primary is off)"
    states = []
    for node in cluster.nodes:
        health = node.health
        state = health.reason if not health.up else None
        if state is None and node.role == "replica" and not health.fresh:
            state = f"lagging ({health.lag_bytes} bytes, {health.lag_seconds or 0.0:.1f}s)"
        states.append(f"{node.name}: {state or node.role or 'role unknown'}")
    return f"cluster {cluster.name} has no {wanted} available ({'; '.join(states)})"


def _server_refused(exc: BaseException) -> bool:
    """The server (not one stale connection) failed us: unreachable, timed out, or refusing."""
    state = sqlstate(exc)
    if state in NO_EJECT_SQLSTATES:
        return False
    if state in _REFUSED_SQLSTATES:
        return True
    return any(isinstance(error, OSError) for error in error_chain(exc))


async def _rollback_quietly(session: AsyncSession) -> None:
    # The original error matters more than a failed rollback on a dead connection; close()
    # (in AsyncSession.__aexit__) invalidates such a connection anyway.
    try:
        await session.rollback()
    except (DBAPIError, OSError):
        logger.debug("rollback failed after an error", exc_info=True)


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await asyncio.shield(session.close())
    except (DBAPIError, OSError):
        logger.debug("close failed after a connect error", exc_info=True)
