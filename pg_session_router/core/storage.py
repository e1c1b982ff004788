"""Storage ownership: every tenant's data lives where no other tenant's does.

A tenant *claims* storage: a database tenant a whole database on one server; a schema tenant
one schema of its cluster's database; a row tenant the shared tables of its cluster's database
(shared with other row tenants by design, isolated by row-level security). Claims are compared
by server and name, not by cluster name, so two cluster names for one server cannot hide a
collision; servers are compared by normalised host (case, and the loopback spellings
`localhost`, `127.0.0.1`, `::1` are one host) and port. Rules:

- a whole database belongs to one tenant, and never to a configured cluster's own database
  (unless the tenant is placed on that cluster alone, `cluster = "..."`, and it is not the
  default cluster, which holds the catalog);
- a schema belongs to one tenant (`co-op` and `co_op` both want `co_op`: refused), and no
  tenant's schema is named after a role the router connects as (it would come first in every
  `search_path` that starts with `"$user"`);
- nothing else may be placed in a database a tenant owns.

`claims` builds the claims of a set of tenants with the same rules wherever it is used: the
configuration file at startup, catalog rows when they are read (a row that collides is not
routable), and `add_tenant` under a lock (two processes adding colliding tenants at once
cannot both succeed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.engine import URL

from pg_session_router.core.names import default_schema_name
from pg_session_router.core.settings import ClusterSettings, DatabaseSettings, TenantSettings

Kind = Literal["database", "schema", "rows", "cluster"]
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


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
    """`host:port`, normalised: the one spelling of a server used for ownership and health."""
    host = (url.host or "").lower().rstrip(".")
    if host in _LOOPBACK:
        host = "127.0.0.1"
    return f"{host}:{url.port or 5432}"


def _cluster_url(cluster: ClusterSettings) -> URL:
    url = cluster.primary if cluster.primary is not None else cluster.nodes[0]
    assert url.database is not None  # checked when the URL is parsed
    return url


def _all_urls(database: DatabaseSettings) -> Iterable[URL]:
    for cluster in database.clusters.values():
        if cluster.primary is not None:
            yield cluster.primary
        yield from (replica.url for replica in cluster.replicas)
        yield from cluster.nodes


def reserved_schema_names(database: DatabaseSettings) -> set[str]:
    """Roles the router connects as: a schema of that name shadows `"$user"` paths."""
    return {url.username for url in _all_urls(database) if url.username}


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


def _owns_its_cluster(tenant: TenantSettings) -> bool:
    return tenant.strategy == "database" and bool(tenant.cluster) and not tenant.database


def cluster_claims(
    database: DatabaseSettings, tenants: Mapping[str, TenantSettings]
) -> list[Claim]:
    """Configured clusters' own databases, except those a tenant of `tenants` is placed on
    alone (then that database is the tenant's, not a shared one)."""
    owned = {
        t.cluster
        for t in tenants.values()
        if _owns_its_cluster(t) and t.cluster != database.default_cluster
    }
    return [
        Claim(f"cluster {name}", "cluster", server_of(url), url.database or "")
        for name, url in ((n, _cluster_url(c)) for n, c in database.clusters.items())
        if name not in owned
    ]


class ClaimIndex:
    """Claims grouped by (server, database): each check is a few dictionary reads, so a catalog
    of ten thousand tenants is checked in linear time."""

    def __init__(self, claims: Iterable[Claim] = ()) -> None:
        self._members: dict[tuple[str, str], list[Claim]] = {}
        self._whole: dict[tuple[str, str], Claim] = {}  # "database" claims: a whole database
        self._schemas: dict[tuple[str, str, str], Claim] = {}
        for claim in claims:
            self.add(claim)

    def conflict(self, claim: Claim) -> Claim | None:
        """The claim `claim` collides with, if any."""
        key = (claim.server, claim.database)
        whole = self._whole.get(key)
        if whole is not None and whole.owner != claim.owner:
            return whole
        if claim.kind == "database":
            return next((c for c in self._members.get(key, ()) if c.owner != claim.owner), None)
        if claim.kind == "schema" and claim.schema is not None:
            other = self._schemas.get((*key, claim.schema))
            if other is not None and other.owner != claim.owner:
                return other
        return None

    def add(self, claim: Claim) -> None:
        key = (claim.server, claim.database)
        self._members.setdefault(key, []).append(claim)
        if claim.kind == "database":
            self._whole.setdefault(key, claim)
        elif claim.kind == "schema" and claim.schema is not None:
            self._schemas.setdefault((*key, claim.schema), claim)


def first_conflict(
    database: DatabaseSettings,
    tenants: Mapping[str, TenantSettings],
    index: ClaimIndex | None = None,
) -> str | None:
    """`<tenant id>: <why>` for the first of `tenants` whose storage is claimed already (by a
    configured cluster, an earlier one of `tenants`, or `index`), else None."""
    index = index or ClaimIndex()
    for claim in cluster_claims(database, tenants):
        index.add(claim)
    for tenant_id, tenant in tenants.items():
        claim = claim_of(database, tenant_id, tenant)
        other = index.conflict(claim)
        if other is not None:
            return f"{tenant_id}: its {claim.describe()} is already used by {other.owner}"
        index.add(claim)
    return None
