"""The connection budget: many database-per-tenant tenants, a small engine LRU, random
traffic, and the server never sees more of our connections than the budget allows."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text

from app.models import Base
from pg_session_router.core.errors import ConfigError
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

from .conftest import database_settings

TENANTS = 12
COUNT_OURS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'session-router:%' "
    "AND application_name <> 'session-router:health'"
)


@pytest.fixture
async def database_tenants(router: SessionRouter) -> AsyncIterator[list[str]]:
    run = uuid.uuid4().hex[:6]
    tenants = [f"budget-{i}-{run}" for i in range(TENANTS)]
    for tenant in tenants:
        settings = TenantSettings(strategy="database", database=tenant.replace("-", "_"))
        await provisioning.add_tenant(router, tenant, settings, metadata=Base.metadata)
    try:
        yield tenants
    finally:
        for tenant in tenants:
            await provisioning.remove_tenant(router, tenant, drop=True)


def budgeted_settings(pg: DevCluster) -> tuple[int, object]:
    # main: 3 nodes x 2 connections; tenants: 6 engines (two tenant clusters of 3 nodes) x 1.
    budget = 3 * 2 + 6 * 1
    settings = database_settings(
        pg,
        max_connections=budget,
        tenancy={"max_engines": 6, "pool": {"size": 1, "max_overflow": 0, "timeout": 10}},
    )
    main = settings.clusters["main"].model_copy(
        update={
            "pool": settings.clusters["main"].pool.model_copy(update={"size": 2, "max_overflow": 0})
        }
    )
    return budget, settings.model_copy(update={"clusters": {"main": main}})


async def test_random_traffic_never_holds_more_connections_than_the_budget(
    migrated: DevCluster, database_tenants: list[str]
) -> None:
    pg = migrated
    budget, settings = budgeted_settings(pg)
    router = SessionRouter(settings)  # type: ignore[arg-type]
    await router.start()
    observers = [
        await asyncpg.connect(
            host="127.0.0.1", port=node.port, user="postgres", database="postgres"
        )
        for node in pg.nodes.values()
    ]
    peak = 0
    stop = asyncio.Event()
    failures: list[BaseException] = []
    served = 0

    async def observe() -> None:
        nonlocal peak
        while not stop.is_set():
            counts = [await conn.fetchval(COUNT_OURS) for conn in observers]
            peak = max(peak, sum(counts))
            await asyncio.sleep(0.005)

    async def traffic(seed: int) -> None:
        nonlocal served
        rng = random.Random(seed)
        for _ in range(40):
            tenant = rng.choice(database_tenants)
            try:
                async with router.session(tenant=tenant, read_only=rng.random() < 0.7) as s:
                    await s.execute(text("SELECT pg_sleep(0.002)"))
                served += 1
            except Exception as exc:  # counted: the test expects none
                failures.append(exc)

    watcher = asyncio.create_task(observe())
    try:
        await asyncio.gather(*(traffic(seed) for seed in range(16)))
    finally:
        stop.set()
        await watcher
        for conn in observers:
            await conn.close()
        await router.dispose()
    assert failures == []
    assert served == 16 * 40
    assert 0 < peak <= budget
    assert router.tenant_clusters.engines <= 6


def test_a_budget_the_pools_could_exceed_is_refused_at_startup(migrated: DevCluster) -> None:
    settings = database_settings(migrated, max_connections=5)
    with pytest.raises(ConfigError, match=r"database\.max_connections: the pools may open up to"):
        SessionRouter(settings)
