"""`SessionRouter`: the facade over topology, admission, routing and the unit of work.

One router per event loop holds every engine of an application. `router.session(target)`
resolves the target to a node (attribute reads, no I/O), opens an `AsyncSession` bound to that
node for the whole unit of work (it checks out on its first statement, and a statement whose
connection is dead or cannot be had is replayed on the next eligible node while that is safe),
and on exit commits, or rolls back on error. `router.run(fn, target)`
also replays a unit of work that failed midway, when replaying is safe (read-only work, or a
write that provably never reached COMMIT).

Binding a whole session to one node, instead of routing statement by statement through
`get_bind`, is deliberate: a unit of work that reads then writes must see its own writes, and
bulk writes must never be sent to a replica.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from pg_session_router.core.errors import NoNodeAvailableError, TargetError
from pg_session_router.core.settings import DatabaseSettings, RouterSettings
from pg_session_router.core.validation import check_database_settings
from pg_session_router.db.admission import TenantAdmission
from pg_session_router.db.catalog import TenantCatalog
from pg_session_router.db.catalog_listener import CatalogListener
from pg_session_router.db.cluster import Cluster, Node
from pg_session_router.db.consistency import ConsistencyToken, read_wal_position
from pg_session_router.db.drain import DrainReport
from pg_session_router.db.drain import drain as drain_server
from pg_session_router.db.drain import undrain as undrain_server
from pg_session_router.db.driver_errors import is_read_retryable, is_write_retryable
from pg_session_router.db.events import Observers
from pg_session_router.db.health import HealthMonitor
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.registry import TenantRegistry
from pg_session_router.db.retry import RetryPolicy
from pg_session_router.db.routing import Route, route_in_cluster, why_unavailable
from pg_session_router.db.status import router_status
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import Placement
from pg_session_router.db.tenant_clusters import TenantClusterCache
from pg_session_router.db.topology import Topology
from pg_session_router.db.unit_of_work import SessionOpener, UnitOfWork

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SessionRouter:
    """Holds the clusters of one application and hands out sessions bound to the right node."""

    def __init__(self, settings: DatabaseSettings) -> None:
        check_database_settings(settings)
        self.settings = settings
        #: Subscribe metrics, tracing or your own `RouterObserver` here.
        self.events = Observers()
        self.monitor = HealthMonitor(
            settings.health,
            settings.routing,
            lambda: self._topology.replica_groups(),
            self.events,
        )
        catalog = TenantCatalog(lambda: self.default_cluster.primary.engine, settings)
        self.tenants = TenantRegistry(settings, catalog if settings.tenancy.catalog else None)
        self._topology = Topology(settings, self.monitor, self.tenants.settings_of)
        #: Catalog changes pushed by other processes (LISTEN/NOTIFY), from `start()` on.
        self.catalog_listener = (
            CatalogListener(
                self.tenants,
                self._catalog_writer,
                settings.connect_timeout,
                settings.dead_connection_timeout,
            )
            if settings.tenancy.catalog
            else None
        )
        self._admission = TenantAdmission(self._topology, self.tenants, settings.tenancy)
        self.retry_policy = RetryPolicy(settings.retry, self.events)
        self._opener = SessionOpener(
            self.route,
            self._admission,
            self.monitor,
            self.retry_policy,
            self.events,
            max_wait_for_replica=settings.routing.max_wait_for_replica,
        )

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> SessionRouter:
        return cls(settings.database)

    # -- topology --------------------------------------------------------------------------

    @property
    def default_cluster(self) -> Cluster:
        return self._topology.default

    @property
    def clusters(self) -> dict[str, Cluster]:
        """Every cluster built so far, by name (`main`, `main@acme`, `@umbrella`)."""
        return self._topology.clusters

    @property
    def tenant_clusters(self) -> TenantClusterCache:
        """The LRU of tenant database engines (`engines`, `max_engines`, `len()`)."""
        return self._admission.engines

    def cluster(self, key: ClusterKey | str) -> Cluster:
        """A configured cluster, or a tenant's database cluster, built on first use."""
        return self._admission.cluster(ClusterKey.parse(key) if isinstance(key, str) else key)

    def node(self, name: str) -> Node:
        return self._topology.node(name)

    async def close_tenant_cluster(self, key: ClusterKey) -> None:
        """Dispose a tenant cluster's engines now, if it has any (built again on next use)."""
        await self._admission.close_cluster(key)

    # -- routing ---------------------------------------------------------------------------

    def route(
        self, target: Target, placement: Placement | None = None, cluster: Cluster | None = None
    ) -> Route:
        """Target -> node. `placement` and `cluster`: the tenant's, when the caller has
        resolved them already."""
        if target.tenant is not None:
            if target.node is not None or target.cluster is not None:
                raise TargetError("a tenant target picks its own cluster; do not name one")
            placement = placement or self.tenants.placement(target.tenant)
            if cluster is None:
                cluster = self._admission.cluster(placement.cluster_key)
        elif target.node is not None:
            node = self._topology.node(target.node)
            if node.health.drained:  # an operator's decision: not retried until the deadline
                raise TargetError(f"{node.name} is drained (router.undrain to restore)")
            owner = self._topology.owner_of(node)
            return Route(owner, node, target.read_only, None, "explicit-node")
        elif target.cluster is not None:
            cluster = self._topology.configured(target.cluster)
        else:
            cluster = self._topology.default
        return route_in_cluster(cluster, target, placement)

    async def consistency_token(self, cluster: Cluster | str | None = None) -> ConsistencyToken:
        """The WAL position a read must wait for to see what has been committed so far on
        `cluster` (a name or a Cluster; default: the default cluster). One statement outside
        any transaction on the writer."""
        if cluster is None:
            cluster = self.default_cluster
        elif isinstance(cluster, str):
            cluster = self.cluster(cluster)
        writer = cluster.writer()
        if writer is None:
            raise NoNodeAvailableError(why_unavailable(cluster, Target(cluster=cluster.name)))
        async with writer.engine.connect() as connection:
            lsn = await connection.run_sync(read_wal_position)
        return ConsistencyToken(cluster.key.stream, lsn)

    # -- sessions --------------------------------------------------------------------------

    def session(
        self,
        target: Target | str | None = None,
        *,
        tenant: str | None = None,
        read_only: bool = False,
        after: ConsistencyToken | str | None = None,
        consistency_token: bool = False,
        commit_on_exit: bool = True,
    ) -> UnitOfWork:
        """A session bound to one node: commits on success, rolls back on error, always closes.

        With `consistency_token`, a committed write leaves its read-your-writes token in
        `session.info["consistency_token"]` (one query after the COMMIT, on the same session).
        `session.info["node"]` names the node the session went to. `commit_on_exit=False`:
        SQLAlchemy's `async with maker() as session` meaning (the caller commits). `after`:
        a read sees at least what that token's write committed (a background job handed the
        token of the request that enqueued it).
        """
        if type(target) is not Target or tenant is not None or read_only or after is not None:
            target = Target.coerce(target, tenant=tenant, read_only=read_only, after=after)
        return UnitOfWork(
            self._opener, target, with_token=consistency_token, commit_on_exit=commit_on_exit
        )

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
            async with UnitOfWork(self._opener, resolved, deadline_at=deadline_at) as session:
                return await work(session)

        try:
            return await attempt_once()
        except Exception as exc:
            if not safe(exc):
                raise
            logger.info("replaying a unit of work after %s", type(exc).__name__)
            self.events.retried("run", exc)
        return await self.retry_policy.call(
            attempt_once, safe, deadline_at, "run the unit of work", kind="run"
        )

    # -- lifecycle and introspection -------------------------------------------------------

    async def start(self) -> None:
        """Probe every server once, then keep probing in the background; listen for catalog
        changes (with a catalog); refuse (ConfigError) to serve configured row tenants where
        row-level security would not confine them."""
        self._opener.check_loop()
        await self.monitor.start()
        if self.catalog_listener is not None:
            self.catalog_listener.start()
        await self._admission.check_row_security()

    async def drain(self, node: str, *, within: float = 30.0) -> DrainReport:
        """Stop routing new sessions to `node`'s server, wait up to `within` seconds for its
        sessions to end, close its pools (see `db/drain.py`); `undrain` brings it back."""
        return await drain_server(self._topology, node, within=within)

    def undrain(self, node: str) -> list[str]:
        """Route to `node`'s server again; the nodes it brought back."""
        return undrain_server(self._topology, node)

    def _catalog_writer(self) -> Node | None:
        return self.default_cluster.writer()

    @property
    def loop_closed(self) -> bool:
        """True when the loop this router ran on is gone (its pools died with it)."""
        loop = self._opener.loop
        return loop is not None and loop.is_closed()

    def status(self) -> dict[str, Any]:
        listener = self.catalog_listener
        push = listener.subscribed if listener is not None else None
        return router_status(
            self.settings, self._topology, self._admission, self.monitor, catalog_push=push
        )

    async def dispose(self) -> None:
        """Stop the monitor and close every pool. Using the router again restarts both, on
        whichever event loop uses it next."""
        if self.catalog_listener is not None:
            await self.catalog_listener.stop()
        await self.tenants.settle()
        await self.monitor.stop()
        await self._admission.close()
        await self._topology.dispose()
        self._opener.loop = None

    def __repr__(self) -> str:
        clusters = sorted(self._topology.clusters)
        return f"<SessionRouter clusters={clusters} tenants={len(self.tenants)}>"
