"""Managing tenants at runtime: add, enable/disable, remove, list.

Adding a tenant creates its storage (a database, or a schema; nothing for rows), brings its
tables up to date, writes its row in the `tenants` catalog, and makes it routable in this
process at once. Other processes see it on their next catalog reload: at once for an id they
have not seen (a miss reloads, rate-limited), within `tenancy.catalog_ttl` for a change to one
they know.

Tenants defined in the configuration file are listed but not changed here: the file is their
source of truth.

Creating a database needs the CREATEDB privilege; the role the app connects as can have it
without being a superuser (row-level security still applies to it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy import MetaData, delete, insert, text, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pg_session_router.core.errors import ConfigError, TenantConflictError, UnknownTenantError
from pg_session_router.core.names import quote_identifier, validate_tenant_id
from pg_session_router.core.settings import TenantSettings, check_database_settings
from pg_session_router.db.catalog import tenants_table
from pg_session_router.db.consistency import REPLAYED_POSITION
from pg_session_router.db.driver_errors import sqlstate
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.migrate import MigrationTarget, migrate_target
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import Placement, place

_DUPLICATE_DATABASE = "42P04"
#: Seconds `add_tenant` waits for replicas to replay the new tenant's storage.
REPLICATION_WAIT = 10.0
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantInfo:
    tenant_id: str
    settings: TenantSettings
    source: str  # "config" or "catalog"


async def add_tenant(
    router: SessionRouter, tenant_id: str, tenant: TenantSettings, *, metadata: MetaData
) -> Placement:
    """Create the tenant's storage, bring `metadata`'s tables up in it, register it."""
    validate_tenant_id(tenant_id)
    _check_settings(router, tenant_id, tenant)
    if router.tenants.catalog is not None:
        await router.tenants.reload()  # another process may have added it
    if tenant_id in router.tenants:
        raise TenantConflictError(f"tenant {tenant_id!r} already exists")
    placement = place(tenant_id, tenant, router.tenants.default_cluster)
    await _create_storage(router, placement, tenant)
    await _migrate_tenant(router, placement, tenant, metadata)
    async with router.session() as session:
        await session.execute(insert(tenants_table).values(id=tenant_id, **_columns(tenant)))
    await wait_for_replicas(router, placement.cluster_key)
    return router.tenants.remember(tenant_id, tenant)


async def wait_for_replicas(
    router: SessionRouter, cluster_key: ClusterKey, *, within: float = REPLICATION_WAIT
) -> bool:
    """Until every healthy replica of the cluster has replayed the primary's current WAL
    position, so that the new tenant's database, schema and tables exist wherever its reads
    may go. Replication is asynchronous: without this, a read right after `add` could reach a
    replica that has not created them yet. Returns False (and logs) if a replica is too slow."""
    base = router.cluster(ClusterKey.parse(cluster_key.stream))
    if not base.replicas:
        return True
    token = await router.consistency_token(base)
    deadline = time.monotonic() + within
    for replica in base.replicas:
        while replica.health.up:
            async with router.session(Target(node=replica.name, intent="read")) as session:
                replayed = await session.scalar(REPLAYED_POSITION)
            if replayed is not None and replayed >= token.lsn:
                break
            if time.monotonic() > deadline:
                logger.warning(
                    "%s has not replayed the new tenant after %.0fs", replica.name, within
                )
                return False
            await asyncio.sleep(0.02)
    return True


async def set_active(router: SessionRouter, tenant_id: str, *, active: bool) -> None:
    tenant = await _catalog_tenant(router, tenant_id)
    async with router.session() as session:
        await session.execute(
            update(tenants_table).where(tenants_table.c.id == tenant_id).values(active=active)
        )
    router.tenants.remember(tenant_id, tenant.model_copy(update={"active": active}))


async def remove_tenant(router: SessionRouter, tenant_id: str, *, drop: bool = False) -> None:
    """Unroutable at once here; with `drop`, its schema or database is deleted too."""
    tenant = await _catalog_tenant(router, tenant_id)
    placement = place(tenant_id, tenant, router.tenants.default_cluster)
    async with router.session() as session:
        await session.execute(delete(tenants_table).where(tenants_table.c.id == tenant_id))
    router.tenants.forget(tenant_id)
    await router.close_tenant_cluster(placement.cluster_key)
    if drop:
        await _drop_storage(router, placement, tenant)


async def list_tenants(router: SessionRouter) -> list[TenantInfo]:
    if router.tenants.catalog is not None:
        await router.tenants.reload()
    return [
        TenantInfo(
            placement.tenant_id,
            placement.settings,
            "config" if placement.tenant_id in router.settings.tenants else "catalog",
        )
        for placement in sorted(router.tenants, key=lambda p: p.tenant_id)
    ]


async def _catalog_tenant(router: SessionRouter, tenant_id: str) -> TenantSettings:
    validate_tenant_id(tenant_id)
    if router.tenants.catalog is not None:
        await router.tenants.reload()
    if tenant_id in router.settings.tenants:
        raise TenantConflictError(
            f"tenant {tenant_id!r} is defined in the configuration file; change it there"
        )
    if tenant_id not in router.tenants:
        raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
    return router.tenants.settings_of(tenant_id)


def _check_settings(router: SessionRouter, tenant_id: str, tenant: TenantSettings) -> None:
    """The same checks as for tenants in the configuration file."""
    settings = router.settings.model_copy(update={"tenants": {tenant_id: tenant}})
    try:
        check_database_settings(settings)
    except ConfigError as exc:
        raise TenantConflictError(str(exc).replace("database.tenants.", "tenant ")) from None


def _columns(tenant: TenantSettings) -> dict[str, object]:
    return {
        "strategy": tenant.strategy,
        "cluster": tenant.cluster,
        "url": tenant.url.render_as_string(hide_password=False) if tenant.url else None,
        "database": tenant.database,
        "schema": tenant.schema_name,
        "active": tenant.active,
    }


def _server_admin_url(router: SessionRouter, tenant: TenantSettings) -> URL:
    """Where to run CREATE/DROP DATABASE: the tenant's server, on a database that exists."""
    if tenant.url is not None:
        return tenant.url.set(database="postgres")
    cluster_name = tenant.cluster or router.tenants.default_cluster
    return router.cluster(cluster_name).primary.url


async def _on_server(url: URL, statement: str, *, ignore_sqlstate: str | None = None) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: a short-lived autocommit engine.
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    except ProgrammingError as exc:
        if ignore_sqlstate is None or sqlstate(exc) != ignore_sqlstate:
            raise
    finally:
        await engine.dispose()


async def _create_storage(
    router: SessionRouter, placement: Placement, tenant: TenantSettings
) -> None:
    if placement.strategy == "database" and placement.database is not None:
        await _on_server(
            _server_admin_url(router, tenant),
            f"CREATE DATABASE {quote_identifier(placement.database)}",
            ignore_sqlstate=_DUPLICATE_DATABASE,
        )
    # A schema is created by its migration; rows need nothing.


async def _migrate_tenant(
    router: SessionRouter, placement: Placement, tenant: TenantSettings, metadata: MetaData
) -> None:
    if placement.strategy == "row":
        return  # shared tables: migrated with their cluster
    # Building a tenant's cluster reads its settings from the registry: register it, disabled
    # (not routable) until its row is in the catalog.
    router.tenants.remember(placement.tenant_id, tenant.model_copy(update={"active": False}))
    try:
        target = MigrationTarget(
            f"tenant {placement.tenant_id}", placement.cluster_key, placement.schema
        )
        await migrate_target(router, target, metadata)
    except BaseException:
        router.tenants.forget(placement.tenant_id)
        raise


async def _drop_storage(
    router: SessionRouter, placement: Placement, tenant: TenantSettings
) -> None:
    if placement.strategy == "schema" and placement.schema is not None:
        async with router.session(Target(cluster=placement.cluster_key.name)) as session:
            await session.execute(text(f"DROP SCHEMA {quote_identifier(placement.schema)} CASCADE"))
    elif placement.strategy == "database" and placement.database is not None:
        await _on_server(
            _server_admin_url(router, tenant),
            f"DROP DATABASE IF EXISTS {quote_identifier(placement.database)} WITH (FORCE)",
        )
