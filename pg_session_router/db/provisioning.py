"""Managing tenants at runtime: add, enable/disable, remove, list.

Adding a tenant reserves it in the `tenants` catalog first, under an advisory lock shared by
every process, after checking that its id and its storage are nobody else's (configuration and
catalog alike): of two processes adding colliding tenants at once, exactly one succeeds and the
other gets `TenantConflictError` before touching any storage. Then its storage is created (an
existing database or schema is adopted only when asked), its tables are brought up to date, the
replicas are waited for, and it becomes routable: at once in this process, in the others as
soon as the change is pushed to them (they look the id up again), within
`tenancy.catalog_ttl` at the latest. A failure on the way removes the reservation and what
was created.

Removing a tenant with `drop` deletes its data, and says what it deleted: its database or
schema, or, for a row tenant, its rows in every tenant table. Tenants defined in the
configuration file are listed but not changed here: the file is their source of truth.

Creating a database needs the CREATEDB privilege; the role the app connects as can have it
without being a superuser (row-level security still applies to it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from pg_session_router.core.errors import ConfigError, TenantConflictError, UnknownTenantError
from pg_session_router.core.names import validate_tenant_id
from pg_session_router.core.settings import TenantSettings
from pg_session_router.core.storage import first_conflict
from pg_session_router.core.validation import check_tenant
from pg_session_router.db.catalog import accepted_rows, tenant_moves_table, tenants_table
from pg_session_router.db.catalog_listener import notify_statement
from pg_session_router.db.consistency import REPLAYED_POSITION
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.migrate import TargetMigrator, create_all_migrator, target_of
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import Placement, place
from pg_session_router.db.tenant_storage import (
    DataRemoved,
    count_rows,
    create_storage,
    drop_storage,
)

#: Seconds `add_tenant` waits for replicas to replay the new tenant's storage.
REPLICATION_WAIT = 10.0
# Held (transaction-scoped) by every process while it checks and reserves a tenant.
_MANAGEMENT_LOCK = text(f"SELECT pg_advisory_xact_lock({0x5E55_7E47})")
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantInfo:
    tenant_id: str
    settings: TenantSettings
    source: str  # "config" or "catalog"


async def add_tenant(
    router: SessionRouter,
    tenant_id: str,
    tenant: TenantSettings,
    *,
    metadata: MetaData,
    adopt: bool = False,
    migrator: TargetMigrator | None = None,
) -> Placement:
    """Reserve, create storage (adopting an existing one only with `adopt`), bring its tables
    up to date (with `migrator`, by default `metadata.create_all`), wait for the replicas,
    make it routable. `metadata` names the tenant tables (a reused row tenant id is checked
    for leftover rows in them)."""
    validate_tenant_id(tenant_id)
    _check_settings(router, tenant_id, tenant)
    placement = place(tenant_id, tenant, router.tenants.default_cluster)
    await _reserve(router, tenant_id, tenant)
    created = False
    try:
        if placement.strategy == "row" and not adopt:
            await _refuse_leftover_rows(router, placement, metadata)
        created = await create_storage(router, placement, adopt=adopt)
        await _migrate_tenant(router, placement, tenant, migrator or create_all_migrator(metadata))
        if tenant.active:
            await _set_active_row(router, tenant_id, active=True)
    except BaseException:
        await _undo_add(router, placement, created=created)
        raise
    await wait_for_replicas(router, placement.cluster_key)
    return router.tenants.remember(tenant_id, tenant)


async def _refuse_leftover_rows(
    router: SessionRouter, placement: Placement, metadata: MetaData
) -> None:
    """A row tenant's id reused: rows a former tenant of that id left are not inherited."""
    leftovers = await count_rows(router, placement, metadata)
    if any(leftovers.values()):
        counts = ", ".join(f"{n} in {table}" for table, n in leftovers.items() if n)
        raise TenantConflictError(
            f"rows of a former tenant {placement.tenant_id!r} remain ({counts}): adopt them "
            "explicitly (adopt=True, --adopt), or add and remove it with --drop first"
        )


async def _reserve(router: SessionRouter, tenant_id: str, tenant: TenantSettings) -> None:
    """Under the management lock: refuse an id or storage someone has, then write the row
    (disabled until the tenant is ready)."""
    async with router.session() as session:
        await session.execute(_MANAGEMENT_LOCK)
        await _refuse_conflicts(router, session, tenant_id, tenant)
        values = {**_columns(tenant), "active": False}
        await session.execute(insert(tenants_table).values(id=tenant_id, **values))
        await session.execute(notify_statement(tenant_id))


async def _refuse_conflicts(
    router: SessionRouter, session: AsyncSession, tenant_id: str, tenant: TenantSettings
) -> None:
    settings = router.settings
    oldest_first = select(tenants_table).order_by(
        tenants_table.c.created_at, tenants_table.c.id.collate("C")
    )
    rows = (await session.execute(oldest_first)).mappings().all()
    if tenant_id in settings.tenants or any(row["id"] == tenant_id for row in rows):
        raise TenantConflictError(f"tenant {tenant_id!r} already exists")
    await refuse_while_moving(session, tenant_id)
    await _refuse_claimed(router, session, rows, tenant_id, tenant)


async def _refuse_claimed(
    router: SessionRouter,
    session: AsyncSession,
    rows: Sequence[Mapping[Any, Any]],
    tenant_id: str,
    tenant: TenantSettings,
) -> None:
    """The same rules as for the configuration file: existing tenants first (and the other
    side of every move: the target while copying, the old storage until it is dropped), the
    new claim last."""
    settings = router.settings
    every = {**settings.tenants, **accepted_rows(settings, rows)}
    every.pop(tenant_id, None)
    every.update(await _move_claims(session, every))
    conflict = first_conflict(settings, {**every, tenant_id: tenant})
    if conflict is not None:
        raise TenantConflictError(f"tenant {conflict}")


async def _move_claims(
    session: AsyncSession, tenants: Mapping[str, TenantSettings]
) -> dict[str, TenantSettings]:
    if await session.scalar(text(f"SELECT to_regclass('{tenant_moves_table.name}')")) is None:
        return {}
    claims: dict[str, TenantSettings] = {}
    for move in (await session.execute(select(tenant_moves_table))).mappings():
        tenant = tenants.get(move["tenant_id"])
        if tenant is not None:
            other_side = move["source_cluster" if move["state"] == "moved" else "target_cluster"]
            label = f"{move['tenant_id']} (its {move['state']} move's other side)"
            claims[label] = tenant.model_copy(update={"cluster": other_side})
    return claims


async def reserve_move_target(
    router: SessionRouter,
    tenant_id: str,
    target: TenantSettings,
    record: Callable[[AsyncSession], Awaitable[None]],
) -> None:
    """Before a move starts, under the management lock: its target storage must be nobody
    else's; `record` writes the move in the same transaction, so a tenant added meanwhile
    sees the claim."""
    async with router.session() as session:
        await session.execute(_MANAGEMENT_LOCK)
        oldest_first = select(tenants_table).order_by(
            tenants_table.c.created_at, tenants_table.c.id.collate("C")
        )
        rows = (await session.execute(oldest_first)).mappings().all()
        await _refuse_claimed(router, session, rows, tenant_id, target)
        await record(session)


async def refuse_while_moving(session: AsyncSession, tenant_id: str) -> None:
    """A tenant with a move record (under way, or old storage not dropped) is not removed
    or re-added: the move's replication and storage would be left behind, or inherited."""
    if await session.scalar(text(f"SELECT to_regclass('{tenant_moves_table.name}')")) is None:
        return
    query = select(tenant_moves_table.c.state).where(tenant_moves_table.c.tenant_id == tenant_id)
    state = await session.scalar(query)
    if state is not None:
        raise TenantConflictError(
            f"tenant {tenant_id!r} has a move record ({state}): finish it, abort it "
            "(tenants move --abort) or drop its old storage (tenants drop-moved) first"
        )


async def _undo_add(router: SessionRouter, placement: Placement, *, created: bool) -> None:
    router.tenants.forget(placement.tenant_id)
    await router.close_tenant_cluster(placement.cluster_key)
    try:
        if created:
            await drop_storage(router, placement, None)
    finally:
        async with router.session() as session:
            await session.execute(
                delete(tenants_table).where(tenants_table.c.id == placement.tenant_id)
            )
            await session.execute(notify_statement(placement.tenant_id))


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
    replayed_everywhere = True
    for replica in base.replicas:
        try:
            replayed_everywhere &= await _replayed(router, replica.name, token.lsn, deadline)
        except Exception as exc:  # a replica dying meanwhile is the monitor's business
            logger.warning("could not wait for %s: %s", replica.name, describe_error(exc))
            replayed_everywhere = False
    return replayed_everywhere


async def _replayed(router: SessionRouter, replica: str, lsn: int, deadline: float) -> bool:
    node = router.node(replica)
    while node.health.up:
        async with router.session(Target(node=replica, intent="read")) as session:
            replayed = await session.scalar(REPLAYED_POSITION)
        if replayed is not None and replayed >= lsn:
            return True
        if time.monotonic() > deadline:
            logger.warning("%s has not replayed the new tenant in time", replica)
            return False
        await asyncio.sleep(0.02)
    return False


async def set_active(router: SessionRouter, tenant_id: str, *, active: bool) -> None:
    tenant = await catalog_tenant(router, tenant_id)
    await _set_active_row(router, tenant_id, active=active)
    router.tenants.remember(tenant_id, tenant.model_copy(update={"active": active}))


async def _set_active_row(router: SessionRouter, tenant_id: str, *, active: bool) -> None:
    async with router.session() as session:
        await session.execute(
            update(tenants_table).where(tenants_table.c.id == tenant_id).values(active=active)
        )
        await session.execute(notify_statement(tenant_id))


async def remove_tenant(
    router: SessionRouter,
    tenant_id: str,
    *,
    drop: bool = False,
    metadata: MetaData | None = None,
) -> DataRemoved | None:
    """Unroutable at once here. With `drop`, its data is deleted too (a row tenant's rows need
    the `metadata` of the tenant tables); returns what was deleted."""
    tenant = await catalog_tenant(router, tenant_id)
    async with router.session() as session:  # the primary: a move just recorded counts
        await refuse_while_moving(session, tenant_id)
    placement = place(tenant_id, tenant, router.tenants.default_cluster)
    if drop and placement.strategy == "row" and metadata is None:
        raise ConfigError("dropping a row tenant's data needs the MetaData of the tenant tables")
    # Disabled first: no new session writes while its data goes.
    await set_active(router, tenant_id, active=False)
    await router.close_tenant_cluster(placement.cluster_key)
    removed = await drop_storage(router, placement, metadata) if drop else None
    async with router.session() as session:
        await session.execute(delete(tenants_table).where(tenants_table.c.id == tenant_id))
        await session.execute(notify_statement(tenant_id))
    router.tenants.forget(tenant_id)
    return removed


@dataclass(frozen=True, slots=True)
class TenantPage:
    tenants: list[TenantInfo]
    #: Pass as `after` for the next page; None on the last page.
    next_after: str | None


async def list_tenants(
    router: SessionRouter, *, after: str | None = None, limit: int = 1000
) -> TenantPage:
    """One page of tenants by id: the configuration file's (on the first page), then the
    catalog's with ids after `after` (invalid catalog rows are left out). A catalog of any
    size is listed page by page, never read whole."""
    configured = [
        TenantInfo(tenant_id, tenant, "config")
        for tenant_id, tenant in sorted(router.settings.tenants.items())
        if after is None
    ]
    catalog = router.tenants.catalog
    if catalog is None:
        return TenantPage(configured, None)
    rows = await catalog.page(after, limit)
    catalogued = [TenantInfo(tenant_id, tenant, "catalog") for tenant_id, tenant in rows if tenant]
    next_after = rows[-1][0] if len(rows) == limit else None
    return TenantPage(configured + catalogued, next_after)


async def catalog_tenant(router: SessionRouter, tenant_id: str) -> TenantSettings:
    """A catalogued tenant's settings as the catalog has them now (one lookup by id)."""
    validate_tenant_id(tenant_id)
    if tenant_id in router.settings.tenants:
        raise TenantConflictError(
            f"tenant {tenant_id!r} is defined in the configuration file; change it there"
        )
    placement = await router.tenants.lookup(tenant_id)
    if placement is None:
        raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
    return placement.settings


def _check_settings(router: SessionRouter, tenant_id: str, tenant: TenantSettings) -> None:
    """The same checks as for tenants in the configuration file, and no secret in the
    catalog: a URL there is readable by whoever reads the table."""
    try:
        check_tenant(router.settings, tenant_id, tenant)
    except ConfigError as exc:
        raise TenantConflictError(str(exc).replace("database.tenants.", "tenant ")) from None
    if tenant.url is not None and tenant.url.password is not None:
        raise ConfigError(
            "url: a tenant added at runtime must not carry a password in its URL (the catalog "
            "is a table, not a secret store): configure a server with credentials as a "
            "cluster and place the tenant on it, or define the tenant in the configuration file"
        )


def _columns(tenant: TenantSettings) -> dict[str, object]:
    return {
        "strategy": tenant.strategy,
        "cluster": tenant.cluster,
        "url": tenant.url.render_as_string(hide_password=False) if tenant.url else None,
        "database": tenant.database,
        "schema": tenant.schema_name,
        "active": tenant.active,
    }


async def _migrate_tenant(
    router: SessionRouter, placement: Placement, tenant: TenantSettings, migrator: TargetMigrator
) -> None:
    if placement.strategy == "row":
        return  # shared tables: migrated with their cluster
    # Building a tenant's cluster reads its settings from the registry: register it, disabled
    # (not routable) until it is ready.
    router.tenants.remember(placement.tenant_id, tenant.model_copy(update={"active": False}))
    await migrator(router, target_of(router, placement))
