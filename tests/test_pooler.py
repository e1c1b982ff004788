"""Behind a real PgBouncer in transaction mode (two server connections shared by every
client): with `pooler = "pgbouncer-transaction"` reads, writes, schema and row tenants and
consistency tokens work and stay isolated; without it, the stack fails the way its users
report ("prepared statement ... does not exist / already exists")."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import text

from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.devpoolers import PgBouncer
from tests.conftest import APP_ROLE, HEALTH_INTERVAL

SETTINGS = (
    "SELECT current_setting('search_path') || '|' || "
    "coalesce(current_setting('app.tenant_id', true), '') || '|' || "
    "coalesce(current_setting('pg_session_router.tenant', true), '')"
)


@pytest.fixture(scope="module")
def bouncers(migrated: DevCluster) -> Iterator[dict[str, PgBouncer]]:
    started: dict[str, PgBouncer] = {}
    try:
        for name in ("primary", "replica1"):
            started[name] = PgBouncer(migrated.nodes[name].port, pool_size=2, users=(APP_ROLE,))
        yield started
    finally:
        for bouncer in started.values():
            bouncer.stop()


def pooled(pg: DevCluster, bouncers: dict[str, PgBouncer], pooler: str) -> DatabaseSettings:
    config: dict[str, Any] = {
        "connect_timeout": 2.0,
        "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
        "clusters": {
            "main": {
                "primary": bouncers["primary"].url("app", APP_ROLE),
                "replicas": [bouncers["replica1"].url("app", APP_ROLE)],
                "pooler": pooler,
                "probe_urls": {
                    "primary": pg.url(database="app", user=APP_ROLE),
                    "replica1": pg.url("replica1", database="app", user=APP_ROLE),
                },
            }
        },
        "tenants": {
            "globex": {"strategy": "schema"},
            "soylent-corp": {"strategy": "schema"},
            "initech": {"strategy": "row"},
            "hooli": {"strategy": "row"},
        },
    }
    return DatabaseSettings.model_validate(config)


@pytest.fixture
async def through_pooler(
    migrated: DevCluster, bouncers: dict[str, PgBouncer]
) -> AsyncIterator[SessionRouter]:
    router = SessionRouter(pooled(migrated, bouncers, "pgbouncer-transaction"))
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


async def workload(router: SessionRouter, clients: int = 8, rounds: int = 6) -> list[str]:
    """Concurrent sessions with a few different statements each; the errors they got."""
    errors: list[str] = []

    async def client(me: int) -> None:
        for n in range(rounds):
            try:
                async with router.session(read_only=n % 2 == 0) as session:
                    await session.scalar(
                        text("SELECT CAST(:a AS integer) + CAST(:b AS integer)"), {"a": me, "b": n}
                    )
                    await session.scalar(
                        text("SELECT count(*) FROM pg_class WHERE oid > :o"), {"o": n}
                    )
            except Exception as exc:
                errors.append(str(exc).splitlines()[0])

    await asyncio.gather(*(client(me) for me in range(clients)))
    return errors


async def test_without_the_pooler_mode_the_stack_fails_as_users_report(
    migrated: DevCluster, bouncers: dict[str, PgBouncer]
) -> None:
    router = SessionRouter(pooled(migrated, bouncers, "none"))
    try:
        errors = await workload(router)
    finally:
        await router.dispose()
    assert errors, "expected prepared-statement errors through a transaction pooler"
    assert any("prepared statement" in error for error in errors), errors[:3]


async def test_with_the_pooler_mode_the_same_workload_has_no_error(
    through_pooler: SessionRouter,
) -> None:
    assert await workload(through_pooler) == []


async def test_tenants_stay_isolated_when_every_client_shares_two_server_connections(
    through_pooler: SessionRouter,
) -> None:
    """Schema and row tenants and tenant-less sessions interleaved on one server connection:
    each sees its own settings and rows only, and nothing is left for the next client."""
    tag = uuid.uuid4().hex[:6]
    tenants = ["globex", "soylent-corp", "initech", "hooli"]
    seen: dict[str | None, set[str]] = {}

    async def client(tenant: str | None, n: int) -> None:
        async with through_pooler.session(tenant=tenant) as session:
            if tenant is not None:
                await session.execute(
                    text("INSERT INTO items (name) VALUES (:n)"), {"n": f"{tag}-{tenant}-{n}"}
                )
            seen.setdefault(tenant, set()).add(await session.scalar(text(SETTINGS)))
        if tenant is not None:
            async with through_pooler.session(tenant=tenant) as session:
                names = set(
                    await session.scalars(
                        text("SELECT name FROM items WHERE name LIKE :t"), {"t": f"{tag}-%"}
                    )
                )
            assert names and all(name.startswith(f"{tag}-{tenant}-") for name in names), names

    await asyncio.gather(*(client(t, n) for n in range(4) for t in [*tenants, None]))
    assert seen[None] == {'"$user", public||'}  # no tenant: nothing of anyone's
    assert seen["globex"] == {'"globex", pg_temp||globex'}
    assert seen["initech"] == {"public, pg_temp|initech|initech"}
    for tenant in tenants:
        assert len(seen[tenant]) == 1, seen[tenant]


async def test_a_consistency_token_reads_its_write_through_the_pooler(
    through_pooler: SessionRouter,
) -> None:
    name = f"token-{uuid.uuid4().hex[:6]}"
    async with through_pooler.session(tenant="globex", consistency_token=True) as session:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
    token = session.info["consistency_token"]
    async with through_pooler.session(tenant="globex", read_only=True, after=token) as session:
        found = await session.scalar(
            text("SELECT count(*) FROM items WHERE name = :n"), {"n": name}
        )
    assert found == 1
    status = through_pooler.status()
    assert status["nodes"]["main.replica1"]["state"] == "up"
