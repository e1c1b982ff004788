"""The tenant catalog is read robustly: bad rows are skipped one by one, a reload in flight
never undoes what this process just did, and an id that arrives during a reload waits for it.

The catalog table is locked from another connection to hold a reload in flight for as long as
a test needs, on the real server.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncConnection

from pg_session_router.core.errors import UnknownTenantError
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db.catalog import tenants_table
from pg_session_router.db.router import SessionRouter
from tests.support.faults import eventually


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def insert_rows(router: SessionRouter, *rows: dict[str, Any]) -> None:
    async with router.session() as session:
        for row in rows:
            await session.execute(insert(tenants_table).values(**row))


async def delete_rows(router: SessionRouter, *ids: str) -> None:
    async with router.session() as session:
        await session.execute(tenants_table.delete().where(tenants_table.c.id.in_(ids)))


@asynccontextmanager
async def catalog_locked(router: SessionRouter) -> AsyncIterator[AsyncConnection]:
    """Hold an exclusive lock on the catalog: reloads block until the block ends (committed)."""
    async with router.default_cluster.primary.engine.connect() as connection:
        await connection.execute(text("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE"))
        yield connection
        await connection.commit()


async def reload_is_waiting(router: SessionRouter) -> bool:
    async with router.default_cluster.primary.engine.connect() as connection:
        waiting = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'tenants'::regclass"
            )
        )
    return bool(waiting)


async def test_bad_rows_are_skipped_and_never_stop_the_good_ones(router: SessionRouter) -> None:
    good = unique("good")
    bad = [
        {"id": unique("no-place"), "strategy": "database"},  # neither url, database nor cluster
        {"id": "Not-An-Id", "strategy": "row"},
        {"id": unique("lost"), "strategy": "row", "cluster": "nowhere"},
        {"id": unique("public"), "strategy": "schema", "schema": "public"},
        {"id": unique("newline"), "strategy": "schema", "schema": "acme\n"},
    ]
    await insert_rows(router, *bad, {"id": good, "strategy": "row"})
    try:
        await router.tenants.reload()
        assert good in router.tenants
        for row in bad:
            assert row["id"] not in router.tenants
    finally:
        await delete_rows(router, good, *(row["id"] for row in bad))


async def test_changes_made_during_a_reload_survive_it(router: SessionRouter) -> None:
    added, removed = unique("added"), unique("removed")
    await insert_rows(router, {"id": removed, "strategy": "row"})
    await router.tenants.reload()
    assert removed in router.tenants
    try:
        async with catalog_locked(router) as connection:
            reload = asyncio.create_task(router.tenants.reload())
            await eventually(lambda: reload_is_waiting(router), within=5, what="reload blocked")
            # What add_tenant and remove_tenant do once their rows are written:
            await connection.execute(insert(tenants_table).values(id=added, strategy="row"))
            await connection.execute(tenants_table.delete().where(tenants_table.c.id == removed))
            router.tenants.remember(added, TenantSettings(strategy="row"))
            router.tenants.forget(removed)
        await reload
        assert added in router.tenants and removed not in router.tenants
    finally:
        await delete_rows(router, added, removed)


async def test_an_id_arriving_during_a_reload_waits_for_it(router: SessionRouter) -> None:
    newcomer = unique("newcomer")
    await router.tenants.reload()  # just loaded: a miss alone would not reload again now
    try:
        async with catalog_locked(router) as connection:
            reload = asyncio.create_task(router.tenants.reload())
            await eventually(lambda: reload_is_waiting(router), within=5, what="reload blocked")
            lookup = asyncio.create_task(router.tenants.resolve(newcomer))
            await asyncio.sleep(0)
            assert not lookup.done()
            await connection.execute(insert(tenants_table).values(id=newcomer, strategy="row"))
        await reload
        placement = await lookup
        assert placement.tenant_id == newcomer
        with pytest.raises(UnknownTenantError):
            await router.tenants.resolve(unique("nobody"))
    finally:
        await delete_rows(router, newcomer)
