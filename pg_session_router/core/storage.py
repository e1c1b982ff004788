"""Storage ownership: every tenant's data lives where no other tenant's does.

A tenant *claims* storage: a database tenant a whole database on one server; a schema tenant
one schema of its cluster's database; a row tenant the shared tables of its cluster's database
(shared with other row tenants by design, isolated by row-level security). Claims are compared
by server (`host:port`) and name, not by cluster name, so two cluster names for one server
cannot hide a collision. Rules:

- a whole database belongs to one tenant, and never to a configured cluster's own database
  (unless the tenant is placed on that cluster alone, `cluster = "..."`, and it is not the
  default cluster, which holds the catalog);
- a schema belongs to one tenant (`co-op` and `co_op` both want `co_op`: refused);
- nothing else may be placed in a database a tenant owns.

Checked for the configuration file at startup, for catalog rows when they are read (a row that
collides is not routable), and by `add_tenant` under a lock, so two processes adding colliding
tenants at once cannot both succeed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import URL

from pg_session_router.core.names import default_schema_name
from pg_session_router.core.settings import ClusterSettings, DatabaseSettings, TenantSettings

Kind = Literal["database", "schema", "rows", "cluster"]


@dataclass(frozen=True, slots=True)
class Claim:
    owner: str  # tenant id, or "cluster <name>" for a configured cluster's own database
    kind: Kind
    server: str
    database: str
    schema: str | None = None

    def describe(self) -> str:
        where = f"database {self.database!r}"
        return f"schema {self.schema!r} in {where}" if self.schema else where


def server_of(url: URL) -> str:
    return f"{url.host}:{url.port or 5432}"


def _cluster_url(cluster: ClusterSettings) -> URL:
    url = cluster.primary if cluster.primary is not None else cluster.nodes[0]
    assert url.database is not None  # checked when the URL is parsed
    return url


def claim_of(database: DatabaseSettings, tenant_id: str, tenant: TenantSettings) -> Claim:
    """What `tenant` claims; its cluster must exist (see `check_tenant`)."""
    if tenant.url is not None:
        assert tenant.url.database is not None
        return Claim(tenant_id, "database", server_of(tenant.url), tenant.url.database)
    cluster_url = _cluster_url(database.clusters[tenant.cluster or database.default_cluster])
    server, own_database = server_of(cluster_url), cluster_url.database or ""
    if tenant.strategy == "database":
        return Claim(tenant_id, "database", server, tenant.database or own_database)
    if tenant.strategy == "schema":
        schema = tenant.schema_name or default_schema_name(tenant_id)
        return Claim(tenant_id, "schema", server, own_database, schema)
    return Claim(tenant_id, "rows", server, own_database)


def cluster_claims(database: DatabaseSettings) -> list[Claim]:
    return [
        Claim(f"cluster {name}", "cluster", server_of(url), url.database or "")
        for name, url in ((n, _cluster_url(c)) for n, c in database.clusters.items())
    ]


def conflict_between(first: Claim, second: Claim) -> bool:
    if first.owner == second.owner or (first.server, first.database) != (
        second.server,
        second.database,
    ):
        return False
    kinds = {first.kind, second.kind}
    if "database" in kinds:
        return True  # a tenant's database is its own, whatever else wants it
    return kinds == {"schema"} and first.schema == second.schema


def conflict_with(claim: Claim, others: Iterable[Claim]) -> Claim | None:
    return next((other for other in others if conflict_between(claim, other)), None)


def _own_cluster_claims(
    database: DatabaseSettings, tenants: Mapping[str, TenantSettings]
) -> set[str]:
    """Clusters that a database tenant is placed on alone (`cluster = "..."` only): their own
    database is that tenant's, not a shared one."""
    return {
        f"cluster {t.cluster}"
        for t in tenants.values()
        if t.strategy == "database" and t.cluster and not t.database and t.url is None
    } - {f"cluster {database.default_cluster}"}


def first_conflict(database: DatabaseSettings, tenants: Mapping[str, TenantSettings]) -> str | None:
    """`<tenant id>: <why>` for the first tenant whose storage another claims, or None."""
    owned_clusters = _own_cluster_claims(database, tenants)
    accepted = [c for c in cluster_claims(database) if c.owner not in owned_clusters]
    for tenant_id, tenant in tenants.items():
        claim = claim_of(database, tenant_id, tenant)
        other = conflict_with(claim, accepted)
        if other is not None:
            return f"{tenant_id}: its {claim.describe()} is already used by {other.owner}"
        accepted.append(claim)
    return None
