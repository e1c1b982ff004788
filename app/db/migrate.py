"""Bring the example tables up to date on the default cluster and in every tenant.

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

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.router import SessionRouter
from app.db.tenancy import ROW_TENANT_SETTING, quote_identifier
from app.models import Base

logger = logging.getLogger(__name__)

_MIGRATION_LOCK_KEY = 0x5E55_1011  # any constant shared by every migrating process


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    label: str
    engine: AsyncEngine
    schema: str | None = None


def migration_targets(router: SessionRouter) -> list[MigrationTarget]:
    """The default cluster's primary, then each tenant's database or schema."""
    targets = [
        MigrationTarget(
            f"cluster {router.default_cluster.name}", router.default_cluster.primary.engine
        )
    ]
    seen = {router.default_cluster.primary.name}
    for placement in router.tenants:
        cluster = router.cluster(placement.cluster_key)
        if placement.strategy == "schema":
            targets.append(
                MigrationTarget(
                    f"tenant {placement.tenant_id} (schema {placement.schema})",
                    cluster.primary.engine,
                    placement.schema,
                )
            )
        elif cluster.primary.name not in seen:
            seen.add(cluster.primary.name)
            targets.append(
                MigrationTarget(
                    f"tenant {placement.tenant_id} (database on {cluster.primary.name})",
                    cluster.primary.engine,
                )
            )
    return targets


async def migrate(router: SessionRouter) -> list[str]:
    """Migrate every target; returns the labels of what was migrated."""
    done = []
    for target in migration_targets(router):
        async with target.engine.begin() as conn:
            await conn.run_sync(_migrate_sync, target.schema)
        logger.debug("migrated %s", target.label)
        done.append(target.label)
    return done


def _migrate_sync(conn: Connection, schema: str | None) -> None:
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    if schema is not None:
        conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}"))
        conn = conn.execution_options(schema_translate_map={None: schema})
    Base.metadata.create_all(conn)
    for table in Base.metadata.sorted_tables:
        if "tenant_id" in table.c:
            _enable_row_security(conn, table.name, schema)


def _enable_row_security(conn: Connection, table: str, schema: str | None) -> None:
    name = quote_identifier(table)
    if schema is not None:
        name = f"{quote_identifier(schema)}.{name}"
    # A transaction without a tenant sees only rows without one: nothing leaks either way.
    condition = (
        f"tenant_id IS NOT DISTINCT FROM NULLIF(current_setting('{ROW_TENANT_SETTING}', true), '')"
    )
    conn.execute(text(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY"))
    conn.execute(text(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY"))
    conn.execute(text(f"DROP POLICY IF EXISTS tenant_isolation ON {name}"))
    conn.execute(
        text(
            f"CREATE POLICY tenant_isolation ON {name} USING ({condition}) WITH CHECK ({condition})"
        )
    )
