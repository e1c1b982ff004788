"""Schema management shared by every way of migrating: targets, locks, the catalog, RLS.

A *migration target* is one place holding a copy of the application's tables: the default
cluster's primary (which also holds the router's own `tenants` catalog and the tables shared by
`row` tenants), each `schema` tenant's schema and each `database` tenant's database. Whatever
brings tables up to date (`create_all` here, Alembic in `pg_session_router.migrations`) runs
once per target, on its primary, in one transaction that first takes the target's advisory
lock, so two processes migrating the same target at once take turns instead of racing.

`migrate(router, metadata)` is the simple way, `metadata.create_all` per target, for apps and
tests without a revision history. The reference app uses Alembic.

Row-level security: tables holding rows of `row`-placed tenants get a policy keyed on the
transaction-local `app.tenant_id` setting, with FORCE ROW LEVEL SECURITY so that the table's
owner is confined too. Superusers and roles with BYPASSRLS are never confined: the application
must connect as an ordinary role (the demo and the tests use one named `app`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, MetaData, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from pg_session_router.core.errors import UnknownTenantError
from pg_session_router.core.names import quote_identifier
from pg_session_router.db.catalog import catalog_metadata
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.tenancy import CURRENT_ROW_TENANT_SQL, NO_TENANT_SQL, Placement

logger = logging.getLogger(__name__)

# First key of every migration lock; the second is the target's schema (advisory locks are
# per database, so a database target's lock is its own already).
_MIGRATION_LOCK_CLASS = 0x5E55_1011
_LOCK_CALL = "pg_advisory_xact_lock(:lock_class, hashtext(:schema))"


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """One place to migrate. Small and picklable: worker processes receive these."""

    label: str
    cluster_key: ClusterKey
    schema: str | None = None
    #: The default cluster also holds the router's own `tenants` catalog table.
    catalog: bool = False
    #: Create the schema when it is missing: a configuration-file tenant's storage comes
    #: with its migration. A catalogued tenant's is made by `tenants add`; missing, it was
    #: removed since the targets were listed, and must not come back as an orphan.
    creates_schema: bool = False


#: Brings one target up to date (`create_all`, an Alembic upgrade); raises on failure.
TargetMigrator = Callable[[SessionRouter, MigrationTarget], Awaitable[None]]


def default_target(router: SessionRouter) -> MigrationTarget:
    key = router.default_cluster.key
    return MigrationTarget(f"cluster {key}", key, catalog=True)


def migration_targets(
    router: SessionRouter,
    *,
    tenant_ids: Iterable[str] | None = None,
    cluster: str | None = None,
) -> list[MigrationTarget]:
    """The default cluster's primary first, then each tenant's database or schema (each once).

    `tenant_ids`: only these tenants' targets (a `row` tenant's is its cluster's shared
    tables); an unknown id raises `UnknownTenantError`. `cluster`: only targets on that
    configured cluster. The registry must be loaded (`router.tenants.reload()`)."""
    chosen = None if tenant_ids is None else list(dict.fromkeys(tenant_ids))
    for tenant_id in chosen or ():
        if tenant_id not in router.tenants:
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
    targets = [] if chosen is not None else [default_target(router)]
    seen = {targets[0].cluster_key} if targets else set()
    placements = sorted(router.tenants, key=lambda p: p.tenant_id)
    for placement in placements:
        if chosen is not None and placement.tenant_id not in chosen:
            continue
        target = target_of(router, placement)
        if target.schema is None and target.cluster_key in seen:
            continue
        seen.add(target.cluster_key)
        targets.append(target)
    if cluster is not None:
        targets = [t for t in targets if t.cluster_key.stream.split("@")[0] == cluster]
    return targets


def target_of(router: SessionRouter, placement: Placement) -> MigrationTarget:
    """Where a tenant's tables live: its schema, its database, or its cluster's shared tables."""
    key, tenant_id = placement.cluster_key, placement.tenant_id
    if placement.strategy == "schema":
        label = f"tenant {tenant_id} (schema {placement.schema})"
        configured = tenant_id in router.settings.tenants
        return MigrationTarget(label, key, placement.schema, creates_schema=configured)
    if placement.strategy == "database":
        return MigrationTarget(f"tenant {tenant_id} (database)", key)
    if key == router.default_cluster.key:
        return default_target(router)
    return MigrationTarget(f"cluster {key}", key)


def lock_statement(target: MigrationTarget) -> TextClause:
    """Held until the target's transaction ends: one migrating process per target."""
    return text(f"SELECT {_LOCK_CALL}").bindparams(
        lock_class=_MIGRATION_LOCK_CLASS, schema=target.schema or ""
    )


def _setup_statement(
    target: MigrationTarget, *, lock: bool, lock_timeout: float | None
) -> TextClause:
    """One round trip: the lock first (waiting for another migrating process is fine), then
    the transaction-local search path and lock timeout (`set_config(..., true)` is SET LOCAL
    with bound values)."""
    parts = ["set_config('search_path', :search_path, true)"]
    values: dict[str, object] = {"search_path": quote_identifier(target.schema or "public")}
    if lock:
        parts.insert(0, _LOCK_CALL)
        values.update(lock_class=_MIGRATION_LOCK_CLASS, schema=target.schema or "")
    if lock_timeout is not None:
        parts.append("set_config('lock_timeout', :lock_timeout, true)")
        values["lock_timeout"] = f"{int(lock_timeout * 1000)}ms"
    return text(f"SELECT {', '.join(parts)}").bindparams(**values)


def search_path_statement(schema: str | None) -> str:
    """Unqualified names land in the target's schema, never in a schema named after the role
    (the default path starts with "$user")."""
    return f"SET LOCAL search_path TO {quote_identifier(schema or 'public')}"


def prepare_target(conn: Connection, target: MigrationTarget) -> None:
    """What a target needs before its tables: the catalog (default cluster), its schema
    (configuration-file schema tenants)."""
    if target.catalog:
        prepare_catalog(conn)
    if target.schema is not None and target.creates_schema:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(target.schema)}"))


def prepare_catalog(conn: Connection) -> None:
    """The router's own tables (`tenants`, `router_last_writes`), created when missing;
    hidden from tenant sessions. The router owns them, not the app's revision history."""
    catalog_metadata.create_all(conn)
    for table in catalog_metadata.sorted_tables:  # indexes added since the table was created
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    # The router's tables are not for tenants: invisible in a tenant's transaction.
    for table in catalog_metadata.sorted_tables:
        enable_row_security(conn, table.name, None, NO_TENANT_SQL)


async def migrate(router: SessionRouter, metadata: MetaData) -> list[str]:
    """`create_all` on every target, including tenants of the catalog; returns their labels."""
    default = default_target(router)
    migrator = create_all_migrator(metadata)
    await migrator(router, default)  # creates the catalog table, so read it after
    if router.tenants.catalog is not None:
        await router.tenants.reload()
    labels = [default.label]
    try:
        for target in migration_targets(router)[1:]:
            await migrator(router, target)
            labels.append(target.label)
    finally:
        # An app that migrates at startup serves afterwards: back to holding what it uses.
        router.tenants.hold_what_is_used()
    return labels


def create_all_migrator(metadata: MetaData) -> TargetMigrator:
    async def migrate_with_create_all(router: SessionRouter, target: MigrationTarget) -> None:
        async with target_connection(router, target) as conn:
            await conn.run_sync(_create_all, metadata, target)

    return migrate_with_create_all


@asynccontextmanager
async def target_connection(
    router: SessionRouter,
    target: MigrationTarget,
    *,
    lock: bool = True,
    lock_timeout: float | None = None,
) -> AsyncIterator[AsyncConnection]:
    """A transaction on the target's primary holding its migration lock (unless `lock` is
    False, for reads), with its search path set and, for what follows the migration lock,
    `lock_timeout` (seconds). A tenant database's engines are released right after:
    thousands of them must not stay open because a migration visited them."""
    was_open = target.cluster_key.name in router.clusters
    try:
        async with router.cluster(target.cluster_key).primary.engine.begin() as conn:
            await conn.execute(_setup_statement(target, lock=lock, lock_timeout=lock_timeout))
            yield conn
    finally:
        if not was_open:
            await router.close_tenant_cluster(target.cluster_key)


def _create_all(conn: Connection, metadata: MetaData, target: MigrationTarget) -> None:
    prepare_target(conn, target)
    if target.schema is not None:
        conn = conn.execution_options(schema_translate_map={None: target.schema})
    metadata.create_all(conn)
    for table in metadata.sorted_tables:
        if "tenant_id" in table.c:
            enable_row_security(conn, table.name, target.schema, ROW_TENANT_CONDITION)


#: A transaction without a tenant sees only rows without one: nothing leaks either way. The
#: rows of `tenant_id IS NOT DISTINCT FROM <tenant>`, written as an equality or both NULL:
#: that form the planner estimates (from the column's statistics) and an index on
#: `tenant_id` serves. The other estimated one row for any table, so `ORDER BY id LIMIT 10`
#: became a full scan and sort, which grew with the table: 4.2 ms at 30,000 rows, where the
#: primary key's index answers in 0.05 ms (a tenant database's table, all rows NULL).
ROW_TENANT_CONDITION = (
    f"(tenant_id = {CURRENT_ROW_TENANT_SQL}"
    f" OR (tenant_id IS NULL AND {CURRENT_ROW_TENANT_SQL} IS NULL))"
)


def row_security_statements(table: str, schema: str | None, condition: str) -> list[str]:
    """ENABLE + FORCE row level security and the `tenant_isolation` policy on one table."""
    name = quote_identifier(table)
    if schema is not None:
        name = f"{quote_identifier(schema)}.{name}"
    return [
        f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
        f"DROP POLICY IF EXISTS tenant_isolation ON {name}",
        f"CREATE POLICY tenant_isolation ON {name} USING ({condition}) WITH CHECK ({condition})",
    ]


def row_security_removal_statements(table: str) -> list[str]:
    """The inverse of `row_security_statements` (for a downgrade), unqualified."""
    name = quote_identifier(table)
    return [
        f"DROP POLICY IF EXISTS tenant_isolation ON {name}",
        f"ALTER TABLE {name} NO FORCE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} DISABLE ROW LEVEL SECURITY",
    ]


def enable_row_security(conn: Connection, table: str, schema: str | None, condition: str) -> None:
    for statement in row_security_statements(table, schema, condition):
        conn.execute(text(statement))
