"""A pooled connection never carries one owner's session state into another tenant's work.

The pool's own reset is a ROLLBACK: session-level SETs, temporary tables, LISTENs and advisory
locks survive it. The tests below leave such state on the only connection of a one-connection
pool, the way careless application code would, then open the next session (another tenant's,
or the same owner's, which keeps the connection's setup without a reset).
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from app.models import Base
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

from .conftest import database_settings, one_connection_router


async def backend_pid(router: SessionRouter, **target: str) -> int:
    async with router.session(**target) as session:
        return int(await session.scalar(text("SELECT pg_backend_pid()")) or 0)


POLLUTE = [
    "CREATE TEMP TABLE items (id bigint, name text, tenant_id text)",
    "INSERT INTO pg_temp.items VALUES (1, 'planted', 'globex')",
    "SET search_path TO pg_temp, public",
    "SELECT pg_advisory_lock(4242)",
    "SET statement_timeout = '5min'",
]


@pytest.mark.parametrize("polluter", [None, "initech"])
@pytest.mark.parametrize("victim", ["globex", "hooli"])
async def test_state_left_by_one_owner_never_reaches_the_next_tenant(
    one_connection: SessionRouter, polluter: str | None, victim: str
) -> None:
    router = one_connection
    pid = await backend_pid(router)
    target = {"tenant": polluter} if polluter else {}
    async with router.session(**target) as session:
        for statement in POLLUTE:
            await session.execute(text(statement))
    async with router.session(tenant=victim) as session:
        assert await session.scalar(text("SELECT pg_backend_pid()")) == pid  # same connection
        names = (await session.scalars(text("SELECT name FROM items"))).all()
        temp_tables = await session.scalar(
            text("SELECT count(*) FROM pg_class WHERE relpersistence = 't'")
        )
        timeout = await session.scalar(text("SHOW statement_timeout"))
        locks = await session.scalar(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = :pid"),
            {"pid": pid},
        )
    assert "planted" not in names
    assert temp_tables == 0 and timeout != "5min" and locks == 0


async def test_state_left_through_the_raw_engine_is_reset_too(
    one_connection: SessionRouter,
) -> None:
    router = one_connection
    engine = router.default_cluster.primary.engine
    async with engine.connect() as connection:  # outside any routed session
        await connection.execute(text("CREATE TEMP TABLE items (name text)"))
        await connection.execute(text("INSERT INTO items VALUES ('planted')"))
        await connection.commit()
        await connection.execute(text("SET search_path TO pg_temp, public"))
    async with router.session(tenant="hooli") as session:
        names = (await session.scalars(text("SELECT name FROM items"))).all()
        temp_tables = await session.scalar(
            text("SELECT count(*) FROM pg_class WHERE relpersistence = 't'")
        )
    assert "planted" not in names and temp_tables == 0


async def test_the_same_owner_keeps_its_connection_without_a_reset(
    one_connection: SessionRouter,
) -> None:
    """The reset is paid only when a connection changes hands: a tenant's own temporary table
    survives between its units of work (it is its own state)."""
    router = one_connection
    async with router.session(tenant="globex") as session:
        await session.execute(text("CREATE TEMP TABLE scratch (x int)"))
    async with router.session(tenant="globex") as session:
        assert await session.scalar(text("SELECT count(*) FROM pg_temp.scratch")) == 0


async def test_a_tenant_added_again_elsewhere_gets_its_connections_set_up_anew(
    migrated: DevCluster,
) -> None:
    """Another process removes the tenant and adds it again in another schema; this process
    learns the new placement (as a catalog reload does) while its pooled connection is still
    set up for the old one: the next session must get the new setup, not the old schema."""
    # This process reads no catalog (its reads would reset the connection and hide the case).
    router = one_connection_router(migrated, tenancy={"catalog": False})
    other = SessionRouter(database_settings(migrated))
    tenant = f"moving-{uuid.uuid4().hex[:6]}"
    first, second = f"first_{tenant[-6:]}", f"second_{tenant[-6:]}"

    def schema(name: str) -> TenantSettings:
        return TenantSettings.model_validate({"strategy": "schema", "schema": name})

    try:
        await provisioning.add_tenant(other, tenant, schema(first), metadata=Base.metadata)
        router.tenants.remember(tenant, schema(first))
        async with router.session(tenant=tenant) as session:
            assert (await session.scalar(text("SHOW search_path"))).startswith(f'"{first}"')
        await provisioning.remove_tenant(other, tenant, drop=True)
        await provisioning.add_tenant(other, tenant, schema(second), metadata=Base.metadata)
        router.tenants.remember(tenant, schema(second))
        async with router.session(tenant=tenant) as session:  # the same pooled connection
            assert (await session.scalar(text("SHOW search_path"))).startswith(f'"{second}"')
    finally:
        await provisioning.remove_tenant(other, tenant, drop=True)
        await other.dispose()
        await router.dispose()
