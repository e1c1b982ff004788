"""Creating and deleting a tenant's storage: its database, its schema, or its rows.

Creation never adopts what exists unless asked (`adopt`): an existing database or schema may
be another tenant's, or the application's. Deleting a row tenant's data deletes its rows from
every table of the `MetaData` that has a `tenant_id` column, in batches (one short transaction
each, so no long lock), and reports how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import MetaData, Table, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pg_session_router.core.errors import TenantConflictError
from pg_session_router.core.names import quote_identifier
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db.credentials import PasswordProvider
from pg_session_router.db.driver_errors import sqlstate
from pg_session_router.db.migrate import lock_statement, target_of
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import ROW_TENANT_SETTING, Placement

_DUPLICATE_DATABASE = "42P04"
_DUPLICATE_SCHEMA = "42P06"
ROW_BATCH = 1000


@dataclass
class DataRemoved:
    """What `remove_tenant(..., drop=True)` deleted."""

    database: str | None = None
    schema: str | None = None
    rows: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        if self.database is not None:
            return f"dropped database {self.database}"
        if self.schema is not None:
            return f"dropped schema {self.schema}"
        counts = ", ".join(f"{count} from {table}" for table, count in self.rows.items())
        return f"deleted rows: {counts or 'none'}"


def server_admin_url(
    router: SessionRouter, tenant: TenantSettings
) -> tuple[URL, PasswordProvider | None]:
    """Where to run CREATE/DROP DATABASE: the tenant's server itself (not a pooler), on a
    database that exists, and the password's provider if the cluster has one."""
    if tenant.url is not None:
        return tenant.url.set(database="postgres"), None
    cluster_name = tenant.cluster or router.tenants.default_cluster
    node = router.cluster(cluster_name).primary
    return node.direct_url, node.password


async def _on_server(server: tuple[URL, PasswordProvider | None], statement: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: a short-lived autocommit engine.
    url, password = server
    connect_args = {} if password is None else {"password": password}
    engine = create_async_engine(
        url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args=connect_args
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def create_storage(router: SessionRouter, placement: Placement, *, adopt: bool) -> bool:
    """Create the tenant's database or schema; True if created, False if adopted (or rows)."""
    tenant = placement.settings
    try:
        if placement.strategy == "database" and placement.database is not None:
            name = quote_identifier(placement.database)
            await _on_server(server_admin_url(router, tenant), f"CREATE DATABASE {name}")
            return True
        if placement.strategy == "schema" and placement.schema is not None:
            target = Target(cluster=placement.cluster_key.name)
            async with router.session(target) as session:
                await session.execute(text(f"CREATE SCHEMA {quote_identifier(placement.schema)}"))
            return True
    except ProgrammingError as exc:
        if sqlstate(exc) not in (_DUPLICATE_DATABASE, _DUPLICATE_SCHEMA):
            raise
        if not adopt:
            what = "database" if placement.strategy == "database" else "schema"
            raise TenantConflictError(
                f"{what} {placement.database or placement.schema!r} exists already; it may hold "
                "someone else's data. Adopt it explicitly (adopt=True, --adopt) if it is this "
                "tenant's"
            ) from None
    return False


async def drop_storage(
    router: SessionRouter, placement: Placement, metadata: MetaData | None
) -> DataRemoved:
    tenant = placement.settings
    if placement.strategy == "schema" and placement.schema is not None:
        async with router.session(Target(cluster=placement.cluster_key.name)) as session:
            # A migration of this schema running now finishes first (its lock), then fails
            # on the missing schema instead of recreating it.
            await session.execute(lock_statement(target_of(router, placement)))
            await session.execute(text(f"DROP SCHEMA {quote_identifier(placement.schema)} CASCADE"))
        return DataRemoved(schema=placement.schema)
    if placement.strategy == "database" and placement.database is not None:
        name = quote_identifier(placement.database)
        await _on_server(
            server_admin_url(router, tenant), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )
        return DataRemoved(database=placement.database)
    if metadata is None:
        raise ValueError("deleting a row tenant's rows needs the MetaData of its tables")
    return DataRemoved(rows=await delete_rows(router, placement, metadata))


async def count_rows(
    router: SessionRouter, placement: Placement, metadata: MetaData
) -> dict[str, int]:
    """The tenant's rows in every tenant table (row-level security lets it see only those)."""
    counts: dict[str, int] = {}
    async with router.session(Target(cluster=placement.cluster_key.name)) as session:
        await session.execute(_AS_TENANT, {"tenant": placement.tenant_id})
        for table in row_tables(metadata):
            count = await session.scalar(
                text(f"SELECT count(*) FROM {_table_name(table)} WHERE tenant_id = :tenant"),
                {"tenant": placement.tenant_id},
            )
            counts[table.name] = int(count or 0)
    return counts


def _table_name(table: Table) -> str:
    name = quote_identifier(table.name)
    return f"{quote_identifier(table.schema)}.{name}" if table.schema else name


_AS_TENANT = text(f"SELECT set_config('{ROW_TENANT_SETTING}', :tenant, true)")


def row_tables(metadata: MetaData) -> list[Table]:
    return [table for table in metadata.sorted_tables if "tenant_id" in table.c]


async def delete_rows(
    router: SessionRouter, placement: Placement, metadata: MetaData, batch: int = ROW_BATCH
) -> dict[str, int]:
    """Delete the tenant's rows from every tenant table, children first, batch by batch."""
    counts: dict[str, int] = {}
    target = Target(cluster=placement.cluster_key.name)
    for table in reversed(row_tables(metadata)):
        name = _table_name(table)
        # Row-level security confines the DELETE to this tenant's rows; the WHERE says so too.
        statement = text(
            f"WITH doomed AS (SELECT ctid FROM {name} WHERE tenant_id = :tenant LIMIT :batch) "
            f"DELETE FROM {name} WHERE ctid IN (SELECT ctid FROM doomed)"
        )
        counts[table.name] = 0
        while True:
            async with router.session(target) as session:
                await session.execute(_AS_TENANT, {"tenant": placement.tenant_id})
                result = await session.execute(
                    statement, {"tenant": placement.tenant_id, "batch": batch}
                )
            deleted = int(getattr(result, "rowcount", 0) or 0)
            counts[table.name] += deleted
            if deleted < batch:
                break
    return counts
