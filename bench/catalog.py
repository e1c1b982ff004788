"""What a large tenant catalog costs a serving process: memory, cold and warm routing.

`python -m bench.catalog [--quick] [--rounds N]`

For 1k, 10k and 100k catalogued tenants (rows inserted straight into the catalog), one
process uses 1,000 of them (the tenants it serves) and we measure:
- memory held for the catalog (tracemalloc) with on-demand lookups (what the router does),
  against reading the whole catalog (`reload()`, what every process did before, and what
  tools still do), and how long that whole read takes (each process paid it every
  `catalog_ttl`);
- first request of a cold tenant: `resolve()` of an id not held yet (one lookup by id,
  checked against the rows that could claim its storage), p50 and p99;
- routing a warm tenant: `router.route()` for a held catalogued tenant against a tenant of
  the configuration file (a plain dictionary read), in µs per call.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
import tracemalloc
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from bench.common import bench_cluster, parse_args, publish, settings_for, table
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster

USED = 1_000
COLD_SAMPLES = 200
WARM_CALLS = 20_000


async def fill(router: SessionRouter, total: int) -> None:
    async with router.session() as session:
        await session.execute(text("DELETE FROM tenants WHERE id LIKE 'bench-%'"))
        await session.execute(
            text(
                "INSERT INTO tenants (id, strategy) "
                "SELECT 'bench-' || g, 'schema' FROM generate_series(1, :n) g"
            ),
            {"n": total},
        )
    async with router.session() as session:  # what autovacuum does soon after a bulk load
        await session.execute(text("ANALYZE tenants"))


def held_bytes(before: int) -> float:
    gc.collect()
    return (tracemalloc.get_traced_memory()[0] - before) / 1e6


async def on_demand(cluster: DevCluster, total: int, used: int, offset: int = 0) -> list[float]:
    """Serve `used` tenants spread over the catalog: the cold lookup time of each (ms)."""
    router = SessionRouter(settings_for(cluster))
    try:
        step = max(1, total // used)
        ids = [f"bench-{n}" for n in range(1 + offset, total + 1, step)][:used]
        cold: list[float] = []
        for tenant_id in ids:
            started = time.perf_counter()
            await router.tenants.resolve(tenant_id)
            cold.append((time.perf_counter() - started) * 1000)
        return cold
    finally:
        await router.dispose()


async def traced_mb(cluster: DevCluster, work: Callable[[SessionRouter], Awaitable[None]]) -> float:
    """MB a new router holds after `work` (traced: slow, so never timed)."""
    tracemalloc.start()
    try:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        router = SessionRouter(settings_for(cluster))
        try:
            await work(router)
            return held_bytes(base)
        finally:
            await router.dispose()
    finally:
        tracemalloc.stop()


async def held_on_demand(cluster: DevCluster, total: int, used: int) -> float:
    """MB held for the catalog after serving `used` tenants spread over it."""

    async def serve(router: SessionRouter) -> None:
        for n in range(1, total + 1, max(1, total // used)):
            await router.tenants.resolve(f"bench-{n}")

    return await traced_mb(cluster, serve)


async def whole(cluster: DevCluster) -> tuple[float, float]:
    """MB held after reading the whole catalog, and how long the read takes (s, untraced)."""
    router = SessionRouter(settings_for(cluster))
    try:
        started = time.perf_counter()
        await router.tenants.reload()
        seconds = time.perf_counter() - started
    finally:
        await router.dispose()

    async def read_all(router: SessionRouter) -> None:
        await router.tenants.reload()

    return await traced_mb(cluster, read_all), seconds


async def warm_route(cluster: DevCluster, calls: int) -> tuple[float, float]:
    """µs per route() of a held catalogued tenant, and of a configured one."""
    router = SessionRouter(settings_for(cluster))
    try:
        await router.tenants.resolve("bench-1")
        figures = []
        for tenant_id in ("bench-1", "globex"):
            target = Target(tenant=tenant_id)
            router.route(target)
            started = time.perf_counter()
            for _ in range(calls):
                router.route(target)
            figures.append((time.perf_counter() - started) / calls * 1e6)
        return figures[0], figures[1]
    finally:
        await router.dispose()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(cluster: DevCluster, sizes: list[int], used: int, calls: int) -> str:
    rows = []
    setup = SessionRouter(settings_for(cluster))
    try:
        for total in sizes:
            await fill(setup, total)
            held = await held_on_demand(cluster, total, used)
            cold = await on_demand(cluster, total, min(used, COLD_SAMPLES), offset=1)
            everything, seconds = await whole(cluster)
            catalogued, configured = await warm_route(cluster, calls)
            rows.append(
                [
                    f"{total:,}",
                    f"{held:.1f}",
                    f"{everything:.1f}",
                    f"{seconds * 1000:.0f}",
                    f"{statistics.median(cold):.2f} / {quantile(cold, 0.99):.2f}",
                    f"{catalogued:.2f} / {configured:.2f} ({catalogued / configured:.2f}x)",
                ]
            )
        await fill(setup, 0)
    finally:
        await setup.dispose()
    headers = [
        "catalogued tenants",
        f"MB held, {used:,} used (on demand)",
        "MB held, whole catalog (before)",
        "whole read, ms (before: every catalog_ttl)",
        "cold tenant, ms p50 / p99",
        "warm route µs: catalogued / configured",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.catalog", argv, rounds=1)
    sizes, used, calls = (
        ([200, 1_000], 100, 2_000) if args.quick else ([1_000, 10_000, 100_000], USED, WARM_CALLS)
    )
    with bench_cluster(replicas=1) as cluster:
        body = asyncio.run(measure(cluster, sizes, used, calls))
    return publish("Large catalogs (per process)", body)


if __name__ == "__main__":
    main()
