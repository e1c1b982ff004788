"""Row tenants are refused where row-level security would not confine them.

Run as `postgres` (a superuser), one row tenant could read and delete another's rows; so could
a role with BYPASSRLS, and the owner of a table without FORCE ROW LEVEL SECURITY. The router
checks before serving row tenants, at startup and on first use.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from pg_session_router.core.errors import ConfigError
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

from .conftest import APP_ROLE, database_settings

BYPASSER = "bypasser"


def settings_as(pg: DevCluster, user: str, **overrides: Any) -> Any:
    main = {"primary": pg.url(database="app", user=user)}
    return database_settings(pg, clusters={"main": main}, **overrides)


@pytest.mark.parametrize("role", ["postgres", BYPASSER])
async def test_a_role_that_bypasses_row_security_is_refused_at_startup(
    migrated: DevCluster, role: str
) -> None:
    if role == BYPASSER:
        migrated.sql("primary", f"DROP ROLE IF EXISTS {BYPASSER}")
        migrated.sql("primary", f"CREATE ROLE {BYPASSER} LOGIN BYPASSRLS")
        migrated.sql("primary", f"GRANT {APP_ROLE} TO {BYPASSER}", database="app")
    router = SessionRouter(settings_as(migrated, role))
    try:
        with pytest.raises(ConfigError, match=f"role '{role}'.*BYPASSRLS"):
            await router.start()
        with pytest.raises(ConfigError, match="ordinary role"):
            async with router.session(tenant="initech") as session:
                await session.execute(text("SELECT 1"))
        async with router.session(tenant="globex") as session:  # other strategies are served
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await router.dispose()


async def test_without_row_tenants_a_superuser_is_not_refused(migrated: DevCluster) -> None:
    router = SessionRouter(settings_as(migrated, "postgres", tenants={}))
    try:
        await router.start()
        async with router.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await router.dispose()


async def test_a_tenant_table_without_forced_row_security_is_refused(
    migrated: DevCluster, router: SessionRouter
) -> None:
    async with router.session() as session:
        await session.execute(text("CREATE TABLE loose (id int, tenant_id text)"))
    fresh = SessionRouter(database_settings(migrated))
    try:
        with pytest.raises(ConfigError, match=r"public\.loose"):
            async with fresh.session(tenant="hooli") as session:
                await session.execute(text("SELECT 1"))
    finally:
        await fresh.dispose()
        async with router.session() as session:
            await session.execute(text("DROP TABLE loose"))


async def test_an_ordinary_role_serves_row_tenants(router: SessionRouter) -> None:
    async with router.session(tenant="initech") as session:
        assert await session.scalar(text("SELECT current_setting('app.tenant_id')")) == "initech"


async def test_a_replica_connecting_as_a_superuser_is_refused(migrated: DevCluster) -> None:
    main = {
        "primary": migrated.url(database="app", user=APP_ROLE),
        "replicas": [migrated.url("replica1", database="app", user="postgres")],
    }
    router = SessionRouter(database_settings(migrated, clusters={"main": main}))
    try:
        with pytest.raises(ConfigError, match="role 'postgres'"):
            await router.start()
    finally:
        await router.dispose()


async def test_a_materialized_view_of_tenant_rows_is_refused(
    migrated: DevCluster, router: SessionRouter
) -> None:
    async with router.session() as session:
        await session.execute(text("CREATE MATERIALIZED VIEW every_item AS SELECT * FROM items"))
    fresh = SessionRouter(database_settings(migrated))
    try:
        with pytest.raises(ConfigError, match="every_item"):
            await fresh.start()
    finally:
        await fresh.dispose()
        async with router.session() as session:
            await session.execute(text("DROP MATERIALIZED VIEW every_item"))
