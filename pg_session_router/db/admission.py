"""Tenant admission: from a tenant id to a cluster that may take its session right now.

Two steps, both async only on a miss: the registry resolves the id to a `Placement` (a
dictionary read; an id not held here is looked up in the catalog, by id), and a
database-placed tenant's cluster is built within the engine budget (`TenantClusterCache`: an
LRU of engines that waits for room when every engine is busy). Sessions in flight are counted
per cluster from admission to the end of the unit of work, so an engine is never disposed
under a running session.
"""

from __future__ import annotations

import logging
import time

from pg_session_router.core.errors import ConfigError, TenantMovingError
from pg_session_router.core.settings import TenancySettings
from pg_session_router.db.cluster import Cluster
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.registry import TenantRegistry
from pg_session_router.db.row_security import RowSecurityGuard
from pg_session_router.db.tenancy import Placement
from pg_session_router.db.tenant_clusters import TenantClusterCache
from pg_session_router.db.topology import Topology

logger = logging.getLogger(__name__)
#: Seconds a held write waits for a pushed catalog change before reading the catalog itself
#: (a push can be missed while the listener reconnects).
_MOVE_RECHECK = 0.25


class TenantAdmission:
    def __init__(
        self, topology: Topology, registry: TenantRegistry, settings: TenancySettings
    ) -> None:
        self._topology = topology
        self.registry = registry
        self._move_write_pause = settings.move_write_pause
        self.row_security = RowSecurityGuard()
        self.engines = TenantClusterCache(
            topology.build,
            max_engines=settings.max_engines,
            wait_timeout=settings.pool.timeout,
            on_evict=topology.forget,
        )

    def ready(self, tenant_id: str) -> tuple[Placement, Cluster] | None:
        """The tenant's placement and cluster when nothing is left to do before routing to
        it: known, its cluster admitted (not draining, not replaced), row security verified.
        The hot path of a tenant's unit of work, without an await; None: `placement()` has
        work to do."""
        placement = self.registry.cached(tenant_id)
        if placement is None:
            return None
        key = placement.cluster_key
        cluster = self._topology.get(key)
        if cluster is None or cluster.draining or _moved(cluster, placement):
            return None
        if placement.strategy == "row" and not self.row_security.verified(key):
            return None
        self.engines.touch(key)  # a tenant database's cluster: in use, last to be evicted
        return placement, cluster

    async def placement(self, tenant_id: str) -> Placement:
        """The placement, after whatever `ready` found missing: a catalog read, the cluster's
        admission (again, if it was replaced), row security."""
        placement = self.registry.cached(tenant_id)
        if placement is None:
            placement = await self.registry.resolve(tenant_id)
        cluster = self._topology.get(placement.cluster_key)
        if cluster is not None and _moved(cluster, placement):
            # Removed and added again with another server: never route to the old one.
            await self.close_cluster(placement.cluster_key)
            cluster = None
        if cluster is None or cluster.draining:
            await self._admit(placement.cluster_key)
        if placement.strategy == "row" and not self.row_security.verified(placement.cluster_key):
            await self.row_security.ensure(self.cluster(placement.cluster_key))
        return placement

    async def writable_placement(self, tenant_id: str) -> Placement:
        """A write of a tenant whose move is switching clusters: held until the catalog says
        the switch is done (it goes to the new cluster then), for at most
        `tenancy.move_write_pause`; then `TenantMovingError` (503 + Retry-After)."""
        deadline = time.monotonic() + self._move_write_pause
        while (remaining := deadline - time.monotonic()) > 0:
            await self.registry.changed(min(remaining, _MOVE_RECHECK), tenant_id)
            placement = await self.placement(tenant_id)
            if not placement.writes_paused:
                return placement
        raise TenantMovingError(f"tenant {tenant_id!r} is switching clusters; write not held")

    async def check_row_security(self) -> None:
        """At startup: every cluster that configured row tenants use (ConfigError if not
        confined there). A server that cannot be reached now is checked on first use."""
        keys = {p.cluster_key for p in self.registry if p.strategy == "row"}
        for key in keys:
            try:
                await self.row_security.ensure(self.cluster(key))
            except ConfigError:
                raise
            except Exception as exc:
                logger.warning("row-level security not checked yet on %s: %s", key, exc)

    async def _admit(self, key: ClusterKey) -> None:
        if key.is_configured:
            self._topology.configured(key.name)  # raises TargetError if it does not exist
            return
        self._topology.add(await self.engines.acquire(key))

    def cluster(self, key: ClusterKey) -> Cluster:
        """A cluster by key, a tenant's built at once if missing (migrations, introspection:
        may exceed the engine bound until the next admission evicts)."""
        cluster = self._topology.get(key)
        if cluster is None:
            if key.is_configured:
                return self._topology.configured(key.name)
            cluster = self._topology.add(self.engines.build_now(key))
        else:
            self.engines.touch(key)
        return cluster

    def end_flight(self, cluster: Cluster) -> None:
        """One session on `cluster` ended: an idle tenant cluster may now be evicted."""
        cluster.in_flight -= 1
        if cluster.in_flight == 0:
            self.engines.became_idle(cluster)

    async def close_cluster(self, key: ClusterKey) -> None:
        """Dispose a tenant cluster's engines now, if it has any (built again on next use)."""
        cluster = self._topology.get(key)
        if cluster is not None and key in self.engines:
            await self.engines.evict(cluster)

    async def close(self) -> None:
        await self.registry.close()
        await self.engines.close()


def _moved(cluster: Cluster, placement: Placement) -> bool:
    """A tenant on a server of its own whose URL is no longer the one its engines use."""
    url = placement.settings.url
    return url is not None and cluster.nodes[0].url != url
