"""Tenancy at scale: routing cost as tenants grow, memory per tenant, a tenant engine's cold
start, and peak connections under random traffic over many database tenants with a small LRU.

    python -m bench.tenants [--quick]
"""

from __future__ import annotations

import asyncio
import random
import time
import timeit
import tracemalloc
from typing import Any

import asyncpg
from sqlalchemy import text

from app.models import Base
from bench.common import Series, bench_cluster, parse_args, publish, settings_for, table
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster

COUNT_OURS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'session-router:%' "
    "AND application_name <> 'session-router:health'"
)


def many_tenants(count: int) -> dict[str, Any]:
    strategies = ("schema", "row")
    return {f"t{i:05d}": {"strategy": strategies[i % 2]} for i in range(count)}


def routing_cost(cluster: DevCluster, count: int, rounds: int) -> Series:
    """Microseconds per `route()` of a random registered tenant (no I/O)."""
    router = SessionRouter(settings_for(cluster, tenants=many_tenants(count)))
    ids = list(many_tenants(count))
    targets = [Target(tenant=random.choice(ids), intent="read") for _ in range(1000)]
    series = Series(f"{count} tenants")
    for _ in range(rounds):
        seconds = timeit.timeit(lambda: [router.route(t) for t in targets], number=20)
        series.values.append(seconds / (20 * len(targets)) * 1e6)
    return series


def memory_per_tenant(cluster: DevCluster, count: int) -> float:
    base = settings_for(cluster, tenants={})
    raw = many_tenants(count)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    tenants = {k: TenantSettings.model_validate(v) for k, v in raw.items()}
    router = SessionRouter(base.model_copy(update={"tenants": tenants}))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    del router
    return grown / count


async def cold_start(cluster: DevCluster, tenants: list[str], rounds: int) -> tuple[Series, Series]:
    cold, warm = Series("first session (engine created, connected)"), Series("next session")
    for _ in range(rounds):
        router = SessionRouter(settings_for(cluster))
        for tenant in tenants:
            router.tenants.remember(
                tenant, TenantSettings(strategy="database", database=tenant.replace("-", "_"))
            )
            for series in (cold, warm):
                started = time.perf_counter()
                async with router.session(tenant=tenant) as session:
                    await session.execute(text("SELECT 1"))
                series.values.append((time.perf_counter() - started) * 1e3)
        await router.dispose()
    return cold, warm


async def peak_connections(
    cluster: DevCluster, tenants: list[str], tasks: int, per_task: int
) -> dict[str, float]:
    budget = 3 * 2 + 6 * 1
    settings = settings_for(
        cluster,
        max_connections=budget,
        tenancy={"max_engines": 6, "pool": {"size": 1, "max_overflow": 0}},
    )
    main = settings.clusters["main"].model_copy(
        update={
            "pool": settings.clusters["main"].pool.model_copy(update={"size": 2, "max_overflow": 0})
        }
    )
    router = SessionRouter(settings.model_copy(update={"clusters": {"main": main}}))
    for tenant in tenants:
        router.tenants.remember(
            tenant, TenantSettings(strategy="database", database=tenant.replace("-", "_"))
        )
    observers = [
        await asyncpg.connect(host="127.0.0.1", port=n.port, user="postgres", database="postgres")
        for n in cluster.nodes.values()
    ]
    peak, stop = 0, asyncio.Event()

    async def observe() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, sum([await c.fetchval(COUNT_OURS) for c in observers]))
            await asyncio.sleep(0.005)

    async def traffic(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(per_task):
            async with router.session(tenant=rng.choice(tenants), read_only=True) as session:
                await session.execute(text("SELECT 1"))

    watcher = asyncio.create_task(observe())
    started = time.perf_counter()
    await asyncio.gather(*(traffic(seed) for seed in range(tasks)))
    elapsed = time.perf_counter() - started
    stop.set()
    await watcher
    for connection in observers:
        await connection.close()
    await router.dispose()
    return {"budget": budget, "peak": peak, "sessions_per_s": tasks * per_task / elapsed}


async def create_databases(cluster: DevCluster, count: int) -> list[str]:
    router = SessionRouter(settings_for(cluster))
    tenants = [f"bench-{i}" for i in range(count)]
    try:
        for tenant in tenants:
            settings = TenantSettings(strategy="database", database=tenant.replace("-", "_"))
            await provisioning.add_tenant(router, tenant, settings, metadata=Base.metadata)
    finally:
        await router.dispose()
    return tenants


def run(cluster: DevCluster, *, rounds: int, quick: bool) -> str:
    small, large = routing_cost(cluster, 100, rounds), routing_cost(cluster, 10_000, rounds)
    memory = memory_per_tenant(cluster, 1000 if quick else 10_000)
    tenants = asyncio.run(create_databases(cluster, 4 if quick else 12))
    cold, warm = asyncio.run(cold_start(cluster, tenants[:4], 1 if quick else 3))
    peak = asyncio.run(peak_connections(cluster, tenants, 4 if quick else 16, 10 if quick else 100))
    routing = table(
        ("registered tenants", "µs per routing decision (median)", "spread", "vs 100 tenants"),
        [
            (s.name, f"{s.median:.2f}", f"±{s.spread:.0%}", f"{s.median / small.median:.2f}")
            for s in (small, large)
        ],
    )
    engines = table(
        ("tenant database session", "ms (median)", "spread"),
        [(s.name, f"{s.median:.2f}", f"±{s.spread:.0%}") for s in (cold, warm)],
    )
    budget = table(
        (
            "database tenants",
            "max_engines",
            "connection budget",
            "peak connections seen",
            "sessions/s",
        ),
        [(len(tenants), 6, peak["budget"], peak["peak"], f"{peak['sessions_per_s']:,.0f}")],
    )
    return (
        f"Routing decision (`router.route`, no I/O):\n\n{routing}\n\n"
        f"Memory per registered tenant (validated settings + placement + registry entries, "
        f"measured with tracemalloc over {1000 if quick else 10_000} tenants): "
        f"{memory:,.0f} bytes\n\n"
        f"Cold start of a tenant engine:\n\n{engines}\n\n"
        f"Random read traffic over many database tenants, small LRU (peak counted in "
        f"pg_stat_activity on every node):\n\n{budget}"
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.tenants", argv, rounds=5)
    with bench_cluster() as cluster:
        return publish(
            "Tenants", run(cluster, rounds=1 if args.quick else args.rounds, quick=args.quick)
        )


if __name__ == "__main__":
    main()
