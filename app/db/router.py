"""`SessionRouter`: named clusters and nodes, target -> node, and the session lifecycle.

One router per process holds every engine. `router.session(target)` resolves the target to a
node (a dictionary lookup or two, no I/O), opens an `AsyncSession` bound to that node for the
whole unit of work, checks out a connection, and on exit commits, or rolls back on error.
Binding a whole session to one node, instead of routing statement by statement through
`get_bind`, is deliberate: a unit of work that reads then writes must see its own writes, and
bulk writes must never be sent to a replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import DatabaseSettings, Settings, check_database_settings, load_settings
from app.db.cluster import Cluster, Node
from app.db.errors import DatabaseUnavailableError, ReadOnlySessionError, TargetError
from app.db.targets import Target
from app.db.tenancy import Placement, TenantRegistry

logger = logging.getLogger(__name__)

READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction


@dataclass(frozen=True, slots=True)
class Route:
    """The outcome of routing one target: which node, in which mode, for which tenant."""

    node: Node
    read_only: bool
    placement: Placement | None


class SessionRouter:
    """Holds the clusters of one process and hands out sessions bound to the right node."""

    def __init__(self, settings: DatabaseSettings) -> None:
        check_database_settings(settings)
        self.settings = settings
        self._clusters: dict[str, Cluster] = {
            name: Cluster.from_settings(
                name, cluster, connect_timeout=settings.connect_timeout, database=None
            )
            for name, cluster in settings.clusters.items()
        }
        self.default_cluster = self._clusters[settings.default_cluster]
        self._nodes: dict[str, Node] = {
            node.name: node for cluster in self._clusters.values() for node in cluster.nodes
        }
        self.tenants = TenantRegistry(settings.tenants, settings.default_cluster)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> SessionRouter:
        return cls((settings or load_settings()).database)

    # -- routing -------------------------------------------------------------------------

    @property
    def clusters(self) -> dict[str, Cluster]:
        return dict(self._clusters)

    def cluster(self, key: str) -> Cluster:
        """A configured cluster, or a tenant's database cluster, built on first use."""
        cluster = self._clusters.get(key)
        if cluster is None:
            cluster = self._build_tenant_cluster(key)
            self._clusters[key] = cluster
            self._nodes.update((node.name, node) for node in cluster.nodes)
        return cluster

    def _build_tenant_cluster(self, key: str) -> Cluster:
        base, sep, database = key.partition("@")
        if not sep:
            raise TargetError(f"no cluster named {key!r}")
        timeout = self.settings.connect_timeout
        if not base:  # "@tenant": the tenant's own server, from its url
            tenant = self.tenants.settings(database)
            assert tenant.url is not None
            own = self.settings.clusters[self.settings.default_cluster].model_copy(
                update={"primary": tenant.url, "replicas": []}
            )
            return Cluster.from_settings(key, own, connect_timeout=timeout, database=None)
        return Cluster.from_settings(
            key, self.settings.clusters[base], connect_timeout=timeout, database=database
        )

    def node(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            raise TargetError(f"no node named {name!r}; known: {', '.join(sorted(self._nodes))}")
        return node

    def route(self, target: Target) -> Route:
        placement = None
        if target.tenant is not None:
            if target.node is not None or target.cluster is not None:
                raise TargetError("a tenant target picks its own cluster; do not name one")
            placement = self.tenants.placement(target.tenant)
            cluster = self.cluster(placement.cluster_key)
        elif target.node is not None:
            return Route(self.node(target.node), target.read_only, None)
        elif target.cluster is not None:
            cluster = self._clusters.get(target.cluster) or self.cluster(target.cluster)
        else:
            cluster = self.default_cluster
        if not target.read_only:
            return Route(cluster.primary, False, placement)
        reader = None if target.use_primary else cluster.reader()
        return Route(reader or cluster.primary, True, placement)

    # -- sessions ------------------------------------------------------------------------

    @asynccontextmanager
    async def session(
        self,
        target: Target | str | None = None,
        *,
        tenant: str | None = None,
        read_only: bool = False,
    ) -> AsyncIterator[AsyncSession]:
        """A session bound to one node: commits on success, rolls back on error, always closes."""
        route = self.route(Target.coerce(target, tenant=tenant, read_only=read_only))
        async with self.open(route) as session:
            yield session

    @asynccontextmanager
    async def open(self, route: Route) -> AsyncIterator[AsyncSession]:
        session = route.node.factory(route.read_only)()
        if route.placement is not None:
            session.info["tenant"] = route.placement.tenant_id
            session.sync_session.transaction_setup = route.placement.transaction_setup  # type: ignore[attr-defined]
        # AsyncSession.__aexit__ shields close() from cancellation, so a cancelled request
        # still returns its connection to the pool instead of leaking it.
        async with session:
            await self._connect(session, route)
            try:
                yield session
                await session.commit()
            except DBAPIError as exc:
                await _rollback_quietly(session)
                translated = _translate(exc, route)
                if translated is exc:
                    raise
                raise translated from exc
            except BaseException:
                await _rollback_quietly(session)
                raise

    async def _connect(self, session: AsyncSession, route: Route) -> None:
        """Check out a connection (and run tenant setup) before handing the session out."""
        try:
            await session.connection()
        except (TimeoutError, OSError, PoolTimeoutError, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and not _is_connection_failure(exc):
                raise
            logger.warning("cannot connect to %s: %s", route.node.name, type(exc).__name__)
            raise DatabaseUnavailableError(
                f"database node {route.node.name} is unavailable"
            ) from exc

    # -- lifecycle and introspection -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "default_cluster": self.default_cluster.name,
            "nodes": {
                name: {"role": node.role, "pool": node.pool_status()}
                for name, node in sorted(self._nodes.items())
            },
        }

    async def dispose(self) -> None:
        """Close every pool. The router can still be used; pools reopen on demand."""
        for cluster in list(self._clusters.values()):
            await cluster.dispose()

    def __repr__(self) -> str:
        return f"<SessionRouter clusters={sorted(self._clusters)} tenants={len(self.tenants)}>"


async def _rollback_quietly(session: AsyncSession) -> None:
    # The original error matters more than a failed rollback on a dead connection; close()
    # (in AsyncSession.__aexit__) invalidates such a connection anyway.
    try:
        await session.rollback()
    except (DBAPIError, OSError):
        logger.debug("rollback failed after an error", exc_info=True)


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def _is_connection_failure(exc: DBAPIError) -> bool:
    return exc.connection_invalidated or _sqlstate(exc) in {"57P03", "53300", "57P01", "08006"}


def _translate(exc: DBAPIError, route: Route) -> Exception:
    if route.read_only and _sqlstate(exc) == READ_ONLY_SQLSTATE:
        return ReadOnlySessionError(
            f"write attempted in a read-only session on {route.node.name}; "
            "declare the route or target with write intent"
        )
    return exc
