"""`Topology`: the clusters and nodes of one router, by key and by name.

Configured clusters are built once, from the settings; the clusters of database-placed tenants
are built here on demand (their admission within the engine budget is `admission`'s job) and
forgotten when evicted. Node names are `<cluster key>.<primary|replicaN|nodeN>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pg_session_router.core.errors import TargetError
from pg_session_router.core.settings import DatabaseSettings, PoolSettings, TenantSettings
from pg_session_router.db.cluster import Cluster, Node
from pg_session_router.db.credentials import provider_of
from pg_session_router.db.health import HealthMonitor, ServerHealth
from pg_session_router.db.keys import ClusterKey


class Topology:
    def __init__(
        self,
        settings: DatabaseSettings,
        monitor: HealthMonitor,
        tenant_settings: Callable[[str], TenantSettings],
    ) -> None:
        self.settings = settings
        self._monitor = monitor
        self._tenant_settings = tenant_settings
        self._clusters: dict[ClusterKey, Cluster] = {}
        self._nodes: dict[str, Node] = {}
        #: One provider per configured cluster, shared by its tenant databases' engines (a
        #: function's cached token is fetched once).
        self._passwords = {
            name: provider_of(cluster.credentials)
            for name, cluster in settings.clusters.items()
            if cluster.credentials is not None
        }
        for name in settings.clusters:
            self.add(self.build(ClusterKey.configured(name)))
        self.default = self._clusters[ClusterKey.configured(settings.default_cluster)]

    def build(self, key: ClusterKey) -> Cluster:
        """A new cluster for `key` (not yet reachable by name: see `add`)."""
        pool: PoolSettings | None = None
        if key.own_server_of is not None:  # the tenant's own server, from its url
            tenant = self._tenant_settings(key.own_server_of)
            # The default cluster's options, but nothing that names its servers or secrets.
            base = self.settings.clusters[self.settings.default_cluster].model_copy(
                update={
                    "primary": tenant.url,
                    "replicas": [],
                    "nodes": [],
                    "probe_urls": {},
                    "credentials": None,
                    "pooler": "none",
                    "admin": None,
                }
            )
            pool = self.settings.tenancy.pool
        elif key.cluster in self.settings.clusters:
            base = self.settings.clusters[key.cluster]
            if not key.is_configured:
                pool = self.settings.tenancy.pool
        else:
            raise TargetError(f"no cluster named {key.name!r}")
        password = None if key.cluster is None else self._passwords.get(key.cluster)
        return Cluster.from_settings(
            key, base, monitor=self._monitor, database=self.settings, pool=pool, password=password
        )

    def add(self, cluster: Cluster) -> Cluster:
        self._clusters[cluster.key] = cluster
        self._nodes.update((node.name, node) for node in cluster.nodes)
        return cluster

    def forget(self, cluster: Cluster) -> None:
        """An evicted tenant cluster: unreachable by name, its servers released."""
        if self._clusters.get(cluster.key) is cluster:
            del self._clusters[cluster.key]
        for node in cluster.nodes:
            if self._nodes.get(node.name) is node:
                del self._nodes[node.name]
            self._monitor.release(node.health)

    def get(self, key: ClusterKey) -> Cluster | None:
        return self._clusters.get(key)

    def configured(self, name: str) -> Cluster:
        cluster = self._clusters.get(ClusterKey.configured(name))
        if cluster is None:
            raise TargetError(f"no cluster named {name!r}")
        return cluster

    def node(self, name: str) -> Node:
        node = self._nodes.get(name)
        if node is None:
            raise TargetError(f"no node named {name!r}; known: {', '.join(sorted(self._nodes))}")
        return node

    def owner_of(self, node: Node) -> Cluster:
        return self._clusters[ClusterKey.parse(node.name.rpartition(".")[0])]

    @property
    def clusters(self) -> dict[str, Cluster]:
        return {key.name: cluster for key, cluster in self._clusters.items()}

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def replica_groups(self) -> Iterator[tuple[ServerHealth, list[ServerHealth]]]:
        """For lag: each configured cluster's writer and the servers that follow it."""
        for name in self.settings.clusters:
            cluster = self._clusters[ClusterKey.configured(name)]
            # The leader by health alone: a drained primary still leads its replicas. While
            # it is down, nothing is judged (an old primary of a split brain leads nobody).
            leader = cluster.leader()
            if leader is not None and leader.health.up:
                yield leader.health, [n.health for n in cluster.nodes if n is not leader]

    async def dispose(self) -> None:
        for cluster in list(self._clusters.values()):
            await cluster.dispose()
