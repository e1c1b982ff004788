"""Storage belongs to one tenant: look-alike ids, reserved names, borrowed databases and
schemas, concurrent adds and `--drop` are tried the way a careless operator would.

Every tenant here is added through `provisioning`, as `python -m app tenants add` does.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from sqlalchemy import insert, select, text

from app.models import Base, Item
from pg_session_router.core.errors import (
    ConfigError,
    TenantConflictError,
    UnknownTenantError,
)
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.catalog import tenants_table
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

from .conftest import APP_ROLE, database_settings


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def schema_tenant(schema: str | None = None) -> TenantSettings:
    return TenantSettings.model_validate({"strategy": "schema", "schema": schema})


@pytest.fixture
async def cleanup(router: SessionRouter) -> AsyncIterator[list[str]]:
    """Tenants a test adds; removed (with their data) afterwards."""
    added: list[str] = []
    yield added
    for tenant_id in added:
        if tenant_id in router.tenants:
            await provisioning.remove_tenant(router, tenant_id, drop=True, metadata=Base.metadata)


async def add(router: SessionRouter, tenant_id: str, tenant: TenantSettings, **kw: bool) -> None:
    await provisioning.add_tenant(router, tenant_id, tenant, metadata=Base.metadata, **kw)


async def test_look_alike_ids_cannot_share_a_schema(
    router: SessionRouter, cleanup: list[str]
) -> None:
    base = unique("co")
    dashed, underscored = f"{base}-op", f"{base}_op"  # both want schema <base>_op
    await add(router, dashed, schema_tenant())
    cleanup.append(dashed)
    async with router.session(tenant=dashed) as session:
        session.add(Item(name="dashed-secret"))
    with pytest.raises(TenantConflictError, match=f"used by {dashed}"):
        await add(router, underscored, schema_tenant())
    assert underscored not in router.tenants
    async with router.session(tenant=dashed) as session:  # untouched
        assert (await session.scalars(select(Item.name))).all() == ["dashed-secret"]


@pytest.mark.parametrize("tenant_id", ["public", "pg_toast", "pg_anything", "information_schema"])
async def test_reserved_schemas_are_refused(router: SessionRouter, tenant_id: str) -> None:
    with pytest.raises((TenantConflictError, ValidationError)):
        await add(router, tenant_id.replace("_", "-"), schema_tenant(tenant_id))
    if "_" not in tenant_id:  # the id itself names a reserved schema
        with pytest.raises(TenantConflictError, match="reserved"):
            await add(router, tenant_id, schema_tenant())


async def test_another_tenants_schema_or_database_cannot_be_borrowed(
    router: SessionRouter,
) -> None:
    with pytest.raises(TenantConflictError, match="used by globex"):
        await add(router, unique("thief"), schema_tenant("globex"))
    on_main = {"strategy": "database", "database": "acme"}
    with pytest.raises(TenantConflictError, match="used by acme"):
        await add(router, unique("thief"), TenantSettings.model_validate(on_main))
    the_apps_own = {"strategy": "database", "database": "app"}
    with pytest.raises(TenantConflictError, match="used by cluster main"):
        await add(router, unique("thief"), TenantSettings.model_validate(the_apps_own))


async def test_existing_storage_is_adopted_only_when_asked(
    router: SessionRouter, cleanup: list[str], pg: DevCluster
) -> None:
    database = unique("orphan_")
    pg.create_database(database, owner=APP_ROLE)  # someone's, not a tenant's
    tenant = TenantSettings.model_validate({"strategy": "database", "database": database})
    tenant_id = database.replace("_", "-")
    with pytest.raises(TenantConflictError, match="exists already"):
        await add(router, tenant_id, tenant)
    assert tenant_id not in router.tenants
    assert database in pg.sql("primary", "SELECT string_agg(datname, ',') FROM pg_database")
    await add(router, tenant_id, tenant, adopt=True)
    cleanup.append(tenant_id)
    async with router.session(tenant=tenant_id) as session:
        assert await session.scalar(text("SELECT current_database()")) == database


async def test_names_the_server_would_truncate_are_refused() -> None:
    with pytest.raises(ValidationError, match="1-63 characters"):
        TenantSettings.model_validate({"strategy": "database", "database": "d" * 64})
    with pytest.raises(ValidationError, match="1-63 characters"):
        TenantSettings.model_validate({"strategy": "schema", "schema": "s" * 64})


async def test_of_two_processes_adding_colliding_tenants_exactly_one_wins(
    migrated: DevCluster, router: SessionRouter, cleanup: list[str]
) -> None:
    other_process = SessionRouter(database_settings(migrated))
    base = unique("race")
    try:
        results = await asyncio.gather(
            add(router, f"{base}-x", schema_tenant()),
            add(other_process, f"{base}_x", schema_tenant()),
            return_exceptions=True,
        )
    finally:
        await other_process.dispose()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], TenantConflictError), results
    await router.tenants.reload()
    winner = next(t for t in (f"{base}-x", f"{base}_x") if t in router.tenants)
    cleanup.append(winner)
    async with router.session(tenant=winner) as session:
        assert await session.scalar(text("SELECT count(*) FROM items")) == 0


async def test_a_hand_written_colliding_catalog_row_is_not_routable_nor_droppable(
    router: SessionRouter,
) -> None:
    intruder = unique("intruder")
    async with router.session() as session:
        await session.execute(
            insert(tenants_table).values(id=intruder, strategy="schema", schema="globex")
        )
    try:
        async with router.session(tenant="globex") as session:
            session.add(Item(name="globex-keeps-this"))
        await router.tenants.reload()
        assert intruder not in router.tenants
        with pytest.raises(UnknownTenantError):
            await provisioning.remove_tenant(router, intruder, drop=True)
        async with router.session(tenant="globex") as session:
            names = (await session.scalars(select(Item.name))).all()
        assert "globex-keeps-this" in names
    finally:
        async with router.session() as session:
            await session.execute(tenants_table.delete().where(tenants_table.c.id == intruder))


async def test_dropping_a_row_tenant_deletes_its_rows_and_says_how_many(
    router: SessionRouter,
) -> None:
    tenant_id = unique("rows-")
    await add(router, tenant_id, TenantSettings(strategy="row"))
    async with router.session(tenant=tenant_id) as session:
        session.add_all([Item(name=f"r{i}") for i in range(5)])
    async with router.session(tenant="initech") as session:
        session.add(Item(name="initech-stays"))
    removed = await provisioning.remove_tenant(router, tenant_id, drop=True, metadata=Base.metadata)
    assert removed is not None and removed.rows == {"items": 5}
    assert removed.describe() == "deleted rows: 5 from items"
    await add(router, tenant_id, TenantSettings(strategy="row"))  # the id, reused
    try:
        async with router.session(tenant=tenant_id) as session:
            assert await session.scalar(text("SELECT count(*) FROM items")) == 0
        async with router.session(tenant="initech") as session:
            names = (await session.scalars(select(Item.name))).all()
            assert "initech-stays" in names
    finally:
        await provisioning.remove_tenant(router, tenant_id, drop=True, metadata=Base.metadata)


async def test_a_row_tenant_drop_without_the_tables_is_refused_not_a_silent_noop(
    router: SessionRouter,
) -> None:
    tenant_id = unique("rows-")
    await add(router, tenant_id, TenantSettings(strategy="row"))
    try:
        with pytest.raises(ConfigError, match="MetaData"):
            await provisioning.remove_tenant(router, tenant_id, drop=True)
        assert tenant_id in router.tenants
    finally:
        await provisioning.remove_tenant(router, tenant_id, drop=True, metadata=Base.metadata)


async def test_no_password_is_written_to_the_catalog(router: SessionRouter) -> None:
    url = "postgresql+asyncpg://app:hunter2@127.0.0.1:5432/elsewhere"
    tenant = TenantSettings.model_validate({"strategy": "database", "url": url})
    with pytest.raises(ConfigError, match="password") as raised:
        await add(router, unique("leaky"), tenant)
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("tenant", ["globex", "initech"])
async def test_tenant_transactions_cannot_read_the_catalog(
    router: SessionRouter, tenant: str
) -> None:
    catalog = text("SELECT count(*) FROM public.tenants")
    async with router.session() as session:
        await session.execute(
            insert(tenants_table).values(
                id="visible-to-the-router-only", strategy="row", active=False
            )
        )
    try:
        async with router.session(tenant=tenant) as session:
            assert await session.scalar(catalog) == 0
        async with router.session() as session:
            assert (await session.scalar(catalog) or 0) >= 1
    finally:
        async with router.session() as session:
            await session.execute(
                tenants_table.delete().where(tenants_table.c.id == "visible-to-the-router-only")
            )


async def test_a_reused_row_tenant_id_does_not_inherit_rows_left_behind(
    router: SessionRouter,
) -> None:
    tenant_id = unique("rows-")
    await add(router, tenant_id, TenantSettings(strategy="row"))
    async with router.session(tenant=tenant_id) as session:
        session.add(Item(name="left-behind"))
    await provisioning.remove_tenant(router, tenant_id)  # no --drop: the rows stay
    try:
        with pytest.raises(TenantConflictError, match="1 in items"):
            await add(router, tenant_id, TenantSettings(strategy="row"))
        assert tenant_id not in router.tenants
        await add(router, tenant_id, TenantSettings(strategy="row"), adopt=True)
        async with router.session(tenant=tenant_id) as session:
            assert (await session.scalars(select(Item.name))).all() == ["left-behind"]
    finally:
        if tenant_id not in router.tenants:
            await add(router, tenant_id, TenantSettings(strategy="row"), adopt=True)
        await provisioning.remove_tenant(router, tenant_id, drop=True, metadata=Base.metadata)


async def test_a_process_looking_tenants_up_one_by_one_refuses_the_same_rows_a_whole_read_does(
    migrated: DevCluster, router: SessionRouter
) -> None:
    """Lookups by id (what serving processes do) check a row against every older row that
    could claim its storage: the newer of two look-alike schema rows, a row reusing an older
    tenant's database, and a row claiming a configured tenant's schema are all refused."""
    base = unique("look")
    older, newer = f"{base}-x", f"{base}_x"  # both claim schema <base>_x
    db_owner, db_thief = unique("dbown"), unique("dbthief")
    intruder = unique("intruder")
    rows = [
        {"id": older, "strategy": "schema"},
        {"id": db_owner, "strategy": "database", "database": db_owner.replace("-", "_")},
        {"id": newer, "strategy": "schema"},
        {"id": db_thief, "strategy": "database", "database": db_owner.replace("-", "_")},
        {"id": intruder, "strategy": "schema", "schema": "globex"},
    ]
    async with router.session() as session:
        for offset, row in enumerate(rows):  # created in this order
            created = text(f"now() + interval '{offset} milliseconds'")
            await session.execute(insert(tenants_table).values(**row, created_at=created))
    serving = SessionRouter(database_settings(migrated))
    try:
        assert (await serving.tenants.resolve(older)).schema == older.replace("-", "_")
        assert (await serving.tenants.resolve(db_owner)).database == db_owner.replace("-", "_")
        for refused in (newer, db_thief, intruder):
            with pytest.raises(UnknownTenantError):
                await serving.tenants.resolve(refused)
        assert serving.tenants.catalog is not None and serving.tenants.catalog.loads == 0
    finally:
        await serving.dispose()
        async with router.session() as session:
            ids = [row["id"] for row in rows]
            await session.execute(tenants_table.delete().where(tenants_table.c.id.in_(ids)))


async def test_a_lookup_refuses_a_whole_database_that_a_schema_tenant_lives_in(
    migrated: DevCluster, router: SessionRouter
) -> None:
    """A careless operator's rows: a schema tenant on cluster `side`, then a tenant whose own
    server URL is `side`'s database, then a tenant owning `side` whole. A whole read keeps
    only the first; so must a process looking the second up by id (it would otherwise read,
    and with `remove --drop` delete, the first's database)."""
    database = f"side_{uuid.uuid4().hex[:6]}"
    migrated.create_database(database, owner=APP_ROLE)
    side = {"primary": migrated.url(database=database, user=APP_ROLE)}
    lives, whole_url, owner = unique("lives"), unique("wholeurl"), unique("owner")
    rows = [
        {"id": lives, "strategy": "schema", "cluster": "side"},
        {"id": whole_url, "strategy": "database", "url": side["primary"]},
        {"id": owner, "strategy": "database", "cluster": "side"},
    ]
    async with router.session() as session:
        for offset, row in enumerate(rows):
            created = text(f"now() + interval '{offset} milliseconds'")
            await session.execute(insert(tenants_table).values(**row, created_at=created))
    settings = database_settings(migrated).model_dump(by_alias=True)
    settings["clusters"]["side"] = side
    serving = SessionRouter(DatabaseSettings.model_validate(settings))
    try:
        for refused in (whole_url, owner):
            with pytest.raises(UnknownTenantError):
                await serving.tenants.resolve(refused)
        assert (await serving.tenants.resolve(lives)).strategy == "schema"
    finally:
        await serving.dispose()
        async with router.session() as session:
            ids = [row["id"] for row in rows]
            await session.execute(tenants_table.delete().where(tenants_table.c.id.in_(ids)))
