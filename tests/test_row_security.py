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
from pg_session_router.db.migrate import ROW_TENANT_CONDITION, row_security_statements
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


@pytest.mark.parametrize("tenant", [None, "t3"])
def test_the_row_policy_leaves_an_ordered_read_to_the_indexes(
    pg: DevCluster, tenant: str | None
) -> None:
    """`ORDER BY id LIMIT 10` on a confined table walks an index, for a row tenant and for a
    transaction without one (a database or schema tenant's own table: all rows NULL). With
    the policy's first form, `tenant_id IS NOT DISTINCT FROM <tenant>`, the planner estimated
    one matching row for any table and scanned and sorted all of them: a GET of 10 items took
    4 ms at 30,000 rows, and longer as the table grew."""
    schema = "policy_plan"
    setup = [
        f"DROP SCHEMA IF EXISTS {schema} CASCADE",
        f"CREATE SCHEMA {schema} AUTHORIZATION {APP_ROLE}",
        f"CREATE TABLE {schema}.items (id bigint PRIMARY KEY, tenant_id text)",
        f"CREATE INDEX ON {schema}.items (tenant_id)",
        f"ALTER TABLE {schema}.items OWNER TO {APP_ROLE}",
        # Half without a tenant, half spread over ten (written as the superuser: unconfined).
        f"INSERT INTO {schema}.items SELECT g, CASE WHEN g % 2 = 0 THEN 't' || (g / 2 % 10) END "
        "FROM generate_series(1, 40000) g",
        f"ANALYZE {schema}.items",
        *row_security_statements("items", schema, ROW_TENANT_CONDITION),
    ]
    pg.sql("primary", "; ".join(setup), database="app")
    as_tenant = f"SET app.tenant_id = '{tenant}'; " if tenant else ""
    try:
        query = f"SET ROLE {APP_ROLE}; {as_tenant}SELECT count(*) FROM {schema}.items"
        assert pg.sql("primary", query, database="app") == ("2000" if tenant else "20000")
        plan = pg.sql(
            "primary",
            f"SET ROLE {APP_ROLE}; {as_tenant}"
            f"EXPLAIN SELECT id FROM {schema}.items ORDER BY id LIMIT 10",
            database="app",
        )
        assert "Index" in plan and "Seq Scan" not in plan, plan
    finally:
        pg.sql("primary", f"DROP SCHEMA {schema} CASCADE", database="app")
