"""Bring an application's tables up to date on the default cluster and in every tenant.

The caller passes the `MetaData` to migrate (the reference app passes its example models');
the router's own `tenants` catalog table is created on the default cluster alongside.

For now a `metadata.create_all` per target (Alembic comes later, behind the same
`python -m app migrate` command). Each target is migrated in one transaction that first takes
an advisory lock, so two processes migrating at once do not race on CREATE statements.

Row-level security: tables holding rows of `row`-placed tenants get a policy keyed on the
transaction-local `app.tenant_id` setting, with FORCE ROW LEVEL SECURITY so that the table's
owner is confined too. Superusers and roles with BYPASSRLS are never confined: the application
must connect as an ordinary role (the demo and the tests use one named `app`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, MetaData, text

from pg_session_router.core.names import quote_identifier
from pg_session_router.db.catalog import catalog_metadata, tenants_table
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.tenancy import CURRENT_ROW_TENANT_SQL, NO_TENANT_SQL

logger = logging.getLogger(__name__)

_MIGRATION_LOCK_KEY = 0x5E55_1011  # any constant shared by every migrating process


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    label: str
    cluster_key: ClusterKey
    schema: str | None = None
    #: The default cluster also holds the router's own `tenants` catalog table.
    catalog: bool = False


def migration_targets(router: SessionRouter) -> list[MigrationTarget]:
    """The default cluster's primary, then each tenant's database or schema (each once)."""
    default = router.default_cluster.key
    targets = [MigrationTarget(f"cluster {default}", default, catalog=True)]
    databases = {default}
    for placement in router.tenants:
        if placement.strategy == "schema":
            label = f"tenant {placement.tenant_id} (schema {placement.schema})"
            targets.append(MigrationTarget(label, placement.cluster_key, placement.schema))
        elif placement.cluster_key not in databases:
            databases.add(placement.cluster_key)
            label = f"tenant {placement.tenant_id} (database {placement.cluster_key})"
            targets.append(MigrationTarget(label, placement.cluster_key))
    return targets


async def migrate(router: SessionRouter, metadata: MetaData) -> list[str]:
    """Migrate every target, including tenants of the catalog; returns what was migrated."""
    default, *tenants = migration_targets(router)
    await migrate_target(router, default, metadata)  # creates the catalog table, so read it after
    if router.tenants.catalog is not None:
        await router.tenants.reload()
        default, *tenants = migration_targets(router)
    for target in tenants:
        await migrate_target(router, target, metadata)
        logger.debug("migrated %s", target.label)
    return [default.label, *(target.label for target in tenants)]


async def migrate_target(
    router: SessionRouter, target: MigrationTarget, metadata: MetaData
) -> None:
    """One target; a tenant database's engines are released right after (thousands of them
    must not stay open because a migration visited them)."""
    was_open = target.cluster_key.name in router.clusters
    cluster = router.cluster(target.cluster_key)
    try:
        async with cluster.primary.engine.begin() as conn:
            await conn.run_sync(_migrate_sync, metadata, target.schema, catalog=target.catalog)
    finally:
        if not was_open:
            await router.close_tenant_cluster(target.cluster_key)


def _migrate_sync(
    conn: Connection, metadata: MetaData, schema: str | None, *, catalog: bool
) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    if catalog:
        catalog_metadata.create_all(conn)
        # Placements are for the router, not for tenants: invisible in a tenant's transaction.
        _enable_row_security(conn, tenants_table.name, None, NO_TENANT_SQL)
    if schema is not None:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}"))
        conn = conn.execution_options(schema_translate_map={None: schema})
    metadata.create_all(conn)
    for table in metadata.sorted_tables:
        if "tenant_id" in table.c:
            _enable_row_security(conn, table.name, schema, _ROW_TENANT_CONDITION)


# A transaction without a tenant sees only rows without one: nothing leaks either way.
_ROW_TENANT_CONDITION = f"tenant_id IS NOT DISTINCT FROM {CURRENT_ROW_TENANT_SQL}"


def _enable_row_security(conn: Connection, table: str, schema: str | None, condition: str) -> None:
    name = quote_identifier(table)
    if schema is not None:
        name = f"{quote_identifier(schema)}.{name}"
    conn.execute(text(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY"))
    conn.execute(text(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY"))
    conn.execute(text(f"DROP POLICY IF EXISTS tenant_isolation ON {name}"))
    conn.execute(
        text(
            f"CREATE POLICY tenant_isolation ON {name} USING ({condition}) WITH CHECK ({condition})"
        )
    )
