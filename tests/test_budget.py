"""The connection budget: many database-per-tenant tenants, a small engine LRU, traffic that
holds every connection the budget allows, and the server never sees more of our connections
than that.

The count comes from the servers (`pg_stat_activity`, by the router's application_name), taken
so that it is never an over-count: a sample is only a lower bound of what was open at one
instant (see `ConnectionCensus`), so any figure above the budget is a real overshoot."""

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
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.faults import eventually

from .conftest import database_settings

TENANTS = 12
MAX_ENGINES = 6
OURS = (
    "SELECT pid, backend_start FROM pg_stat_activity "
    "WHERE application_name LIKE 'session-router:%' "
    # The monitor's probes and the catalog listener are outside the pools' budget.
    "AND application_name NOT IN ('session-router:health', 'session-router:catalog')"
)


class ConnectionCensus:
    """Counts this process's pool connections across every server of the cluster.

    Servers are read one after another, so a plain sum could count a connection closed on one
    server and its replacement opened on another. Instead the servers are read in the order
    A, B, C, B, A: a connection seen on A in both of A's reads was open during all of it, so
    also when C was read; the same for B. The sum is thus a lower bound of the connections open
    at one instant, and a value above the budget proves an overshoot."""

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self.connections = connections
        self.peak = 0
        self.samples = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, pg: DevCluster) -> ConnectionCensus:
        return cls(
            [
                await asyncpg.connect(
                    host="127.0.0.1", port=node.port, user="postgres", database="postgres"
                )
                for node in pg.nodes.values()
            ]
        )

    async def _read(self, conn: asyncpg.Connection) -> set[tuple[int, object]]:
        return {(row["pid"], row["backend_start"]) for row in await conn.fetch(OURS)}

    async def count(self) -> int:
        *outer, middle = self.connections
        async with self._lock:
            first = [await self._read(conn) for conn in outer]
            held = len(await self._read(middle))
            for conn, seen in zip(reversed(outer), reversed(first), strict=True):
                held += len(seen & await self._read(conn))
        self.peak = max(self.peak, held)
        self.samples += 1
        return held

    async def close(self) -> None:
        for conn in self.connections:
            await conn.close()


@pytest.fixture
async def database_tenants(router: SessionRouter) -> AsyncIterator[list[str]]:
    run = uuid.uuid4().hex[:6]
    tenants = [f"budget-{i}-{run}" for i in range(TENANTS)]
    for tenant in tenants:
        settings = TenantSettings(strategy="database", database=tenant.replace("-", "_"))
        await provisioning.add_tenant(router, tenant, settings, metadata=Base.metadata)
    # The provisioning router's own pools would be counted with the budgeted router's (same
    # application names): close them until the teardown needs them again.
    await router.dispose()
    try:
        yield tenants
    finally:
        for tenant in tenants:
            await provisioning.remove_tenant(router, tenant, drop=True, metadata=Base.metadata)


def budgeted_settings(pg: DevCluster) -> tuple[int, DatabaseSettings]:
    # main: 3 nodes x 2 connections; tenants: 6 engines (two tenant clusters of 3 nodes) x 1.
    budget = 3 * 2 + MAX_ENGINES * 1
    settings = database_settings(
        pg,
        max_connections=budget,
        tenancy={"max_engines": MAX_ENGINES, "pool": {"size": 1, "max_overflow": 0, "timeout": 10}},
    )
    main = settings.clusters["main"].model_copy(
        update={
            "pool": settings.clusters["main"].pool.model_copy(update={"size": 2, "max_overflow": 0})
        }
    )
    return budget, settings.model_copy(update={"clusters": {"main": main}})


async def test_traffic_that_fills_the_budget_never_holds_more_connections(
    migrated: DevCluster, database_tenants: list[str]
) -> None:
    pg = migrated
    budget, settings = budgeted_settings(pg)
    router = SessionRouter(settings)
    await router.start()
    census = await ConnectionCensus.open(pg)
    failures: list[BaseException] = []
    served = 0
    max_engines_seen = 0
    stop = asyncio.Event()

    async def hold(tenant: str | None, *, read_only: bool, seconds: float) -> None:
        nonlocal served, max_engines_seen
        try:
            async with router.session(tenant=tenant, read_only=read_only) as session:
                await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
                max_engines_seen = max(max_engines_seen, router.tenant_clusters.engines)
            served += 1
        except Exception as exc:  # counted: the test expects none
            failures.append(exc)

    async def observe() -> None:
        nonlocal max_engines_seen
        while not stop.is_set():
            await census.count()
            max_engines_seen = max(max_engines_seen, router.tenant_clusters.engines)
            await asyncio.sleep(0)

    async def random_traffic(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            tenant = rng.choice([None, *database_tenants])
            await hold(tenant, read_only=rng.random() < 0.7, seconds=rng.choice((0.005, 0.03)))

    def saturate(tenants: list[str | None]) -> list[asyncio.Task[None]]:
        # Per tenant (None: the main cluster), more sessions than its pools hold: two writes
        # (the primary) and four reads (round-robin over both replicas) at once.
        return [
            asyncio.create_task(hold(tenant, read_only=read_only, seconds=0.4))
            for tenant in tenants
            for read_only in (False, False, True, True, True, True)
        ]

    watcher = asyncio.create_task(observe())
    try:
        # Random traffic over every tenant: the LRU keeps evicting and draining.
        await asyncio.gather(*(random_traffic(seed) for seed in range(24)))
        assert failures == []

        # Every pool full at once: main's six connections and two tenant clusters' three each.
        first, second, third = database_tenants[:3]
        held = saturate([None, first, second])
        await eventually(
            lambda: census.peak >= budget, within=10, what="every budgeted connection open"
        )
        assert router.tenant_clusters.engines == MAX_ENGINES
        # A third tenant while both tenant clusters are busy: it must wait for one to drain,
        # never open its connections next to theirs.
        newcomer = asyncio.create_task(hold(third, read_only=False, seconds=0.01))
        held.extend(saturate([None, second]))
        await asyncio.gather(*held, newcomer)
        assert await census.count() <= budget
    finally:
        stop.set()
        await watcher
        await census.close()
        live_engines = router.tenant_clusters.engines
        await router.dispose()
    assert failures == []
    assert served == 24 * 12 + 6 * 3 + 1 + 6 * 2
    assert census.samples > 50
    assert census.peak == budget  # reached, and never exceeded
    assert max_engines_seen <= MAX_ENGINES
    assert 0 < live_engines <= MAX_ENGINES


def test_a_budget_the_pools_could_exceed_is_refused_at_startup(migrated: DevCluster) -> None:
    settings = database_settings(migrated, max_connections=5)
    with pytest.raises(ConfigError, match=r"database\.max_connections: the pools may open up to"):
        SessionRouter(settings)
