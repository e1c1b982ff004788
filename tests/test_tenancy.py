"""Tenant placement: each strategy reaches only its own data, and leaves nothing behind."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import ProgrammingError

from app.models import Item
from pg_session_router.core.errors import (
    InvalidTenantError,
    TenantInactiveError,
    UnknownTenantError,
)
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

from .conftest import one_connection_router, scalar

STATE = (
    "SELECT current_database() || '|' || current_setting('search_path') || '|' || "
    "coalesce(current_setting('app.tenant_id', true), '')"
)


@pytest.mark.parametrize(("tenant", "database"), [("acme", "acme"), ("umbrella", "umbrella")])
async def test_database_tenants_reach_their_own_database(
    router: SessionRouter, tenant: str, database: str
) -> None:
    assert await scalar(router, "SELECT current_database()", tenant=tenant) == database


async def test_database_tenant_on_a_shared_cluster_reads_from_its_replicas(
    router: SessionRouter, pg: DevCluster
) -> None:
    where = "SELECT current_database() || ':' || pg_is_in_recovery()::text"
    assert await scalar(router, where, tenant="acme", read_only=True) == "acme:true"
    assert await scalar(router, where, tenant="acme") == "acme:false"


async def test_schema_tenant_statements_stay_in_its_schema(router: SessionRouter) -> None:
    async with router.session(tenant="globex") as session:
        session.add(Item(name="globex-widget"))
        await session.flush()
        path = await session.scalar(text("SHOW search_path"))
        assert path == '"globex", pg_temp'  # temporary tables never shadow the tenant's
        raw = await session.scalar(text("SELECT count(*) FROM items WHERE name = 'globex-widget'"))
        assert raw == 1
    async with router.session(tenant="soylent-corp") as session:
        names = (await session.scalars(select(Item.name))).all()
        assert "globex-widget" not in names
    async with router.session() as session:  # the shared public schema
        assert (
            await session.scalar(
                text("SELECT count(*) FROM public.items WHERE name = 'globex-widget'")
            )
            == 0
        )
        assert (
            await session.scalar(
                text("SELECT count(*) FROM globex.items WHERE name = 'globex-widget'")
            )
            == 1
        )


async def test_row_tenants_see_only_their_rows(router: SessionRouter) -> None:
    async with router.session(tenant="initech") as session:
        session.add(Item(name="tps-report"))
    async with router.session(tenant="hooli") as session:
        session.add(Item(name="nucleus"))
    async with router.session(tenant="initech") as session:
        names = set((await session.scalars(select(Item.name))).all())
        raw = set((await session.scalars(text("SELECT name FROM items"))).all())
        tenant_ids = set((await session.scalars(text("SELECT tenant_id FROM items"))).all())
    assert "tps-report" in names and "nucleus" not in names
    assert raw == names
    assert tenant_ids == {"initech"}
    async with router.session() as session:  # no tenant: sees no tenant's rows
        tenant_ids = set((await session.scalars(text("SELECT tenant_id FROM items"))).all())
        assert tenant_ids <= {None}


async def test_a_row_tenant_cannot_write_rows_of_another(router: SessionRouter) -> None:
    with pytest.raises(ProgrammingError, match="row-level security"):
        async with router.session(tenant="initech") as session:
            await session.execute(
                text("INSERT INTO items (name, tenant_id) VALUES ('forged', 'hooli')")
            )


async def test_pooled_connections_carry_no_tenant_state(migrated: DevCluster) -> None:
    # One connection, so the next session surely reuses the tenant's connection.
    router = one_connection_router(migrated)
    try:
        clean = await scalar(router, STATE)
        for tenant in ("globex", "initech"):
            for read_only in (False, True):
                inside = await scalar(router, STATE, tenant=tenant, read_only=read_only)
                assert inside != clean
                assert await scalar(router, STATE) == clean
        with pytest.raises(ZeroDivisionError):
            async with router.session(tenant="globex") as session:
                await session.execute(text("SELECT 1"))
                raise ZeroDivisionError
        assert await scalar(router, STATE) == clean
        assert router.default_cluster.primary.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await router.dispose()


async def test_a_new_transaction_in_the_same_session_is_set_up_again(
    router: SessionRouter,
) -> None:
    async with router.session(tenant="globex") as session:
        await session.execute(text("SELECT 1"))
        await session.commit()
        assert await session.scalar(text("SHOW search_path")) == '"globex", pg_temp'


@pytest.mark.parametrize(
    "tenant", ["", "x" * 300, "ACME", "acmé", "../x", "a;drop table items", "a\x00b", "-lead"]
)
async def test_malformed_tenant_ids_are_rejected(router: SessionRouter, tenant: str) -> None:
    with pytest.raises(InvalidTenantError) as caught:
        async with router.session(tenant=tenant):
            pass
    assert tenant not in str(caught.value) or tenant == ""


async def test_unknown_and_disabled_tenants_are_rejected(router: SessionRouter) -> None:
    with pytest.raises(UnknownTenantError, match="nobody"):
        async with router.session(tenant="nobody"):
            pass
    with pytest.raises(TenantInactiveError, match="oldco"):
        async with router.session(tenant="oldco"):
            pass
