"""Session overhead: "open a session, SELECT 1, close" per variant, at concurrency 1 and 16.

Variants, all on the same primary and the same replica with the same pool shape, each measured
right next to its baseline (`measure_pairs`), in a fresh order each round:
- raw asyncpg pool (the floor: no ORM at all),
- hand-written `async_sessionmaker` over one engine (what users write today; the baseline),
- the same with `pool_pre_ping=True` (what they write to survive restarts),
- the same code over a second engine (the A/A control: its ratio to the baseline is what the
  harness reads for two identical variants, the resolution of every other ratio),
- the router (a router per variant, as each hand-written variant has an engine of its own): write
  target, `replica` target, and tenant targets of each placement.

A ratio is the median, over the rounds, of the variant's figure against its baseline's in the
measurement next to it.

    python -m bench.overhead [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench.common import (
    APP_ROLE,
    Series,
    bench_cluster,
    middle_half,
    paired_ratio,
    parse_args,
    publish,
    settings_for,
    table,
)
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster

SELECT_1 = text("SELECT 1")
BASELINE = "hand-written sessionmaker"
CONTROL = "the same, second engine (A/A control)"
COMMIT_BASELINE = "hand-written, primary, COMMIT"
#: A variant compared with a baseline other than BASELINE: a write with the hand-written write.
#: Concurrencies measured unless `--concurrency` says otherwise (the issue's goals are set at both).
CONCURRENCIES = (1, 16)
COMPARED_WITH = {"router, target primary (COMMIT)": COMMIT_BASELINE}
Op = Callable[[], Awaitable[Any]]


async def build_variants(
    cluster: DevCluster,
) -> tuple[dict[str, Op], Callable[[], Awaitable[None]]]:
    """Each variant does one unit of work against the primary or a replica of the cluster."""
    replica_url = cluster.url("replica1", database="app", user=APP_ROLE)
    primary_url = cluster.url("primary", database="app", user=APP_ROLE)
    raw_pool = await asyncpg.create_pool(
        replica_url.replace("postgresql+asyncpg", "postgresql"), min_size=20, max_size=20
    )
    plain = create_async_engine(replica_url, pool_size=20, max_overflow=0)
    control = create_async_engine(replica_url, pool_size=20, max_overflow=0)
    pinged = create_async_engine(replica_url, pool_size=20, max_overflow=0, pool_pre_ping=True)
    plain_primary = create_async_engine(primary_url, pool_size=20, max_overflow=0)
    plain_maker = async_sessionmaker(plain, expire_on_commit=False)
    control_maker = async_sessionmaker(control, expire_on_commit=False)
    pinged_maker = async_sessionmaker(pinged, expire_on_commit=False)
    primary_maker = async_sessionmaker(plain_primary, expire_on_commit=False)
    # Each routed variant gets a router of its own, with the same pool shape and the same
    # single replica as the hand-written variants, as each of those has an engine of its own:
    # with one router for all, the tenant variants would leave the untenanted ones pooled
    # connections set up for a tenant (a reset round trip per connection at each switch),
    # and measure each other.
    main = {
        "primary": primary_url,
        "replicas": [replica_url],
        "pool": {"size": 20, "max_overflow": 0},
    }
    routers: list[SessionRouter] = []

    async def new_router() -> SessionRouter:
        router = SessionRouter(
            settings_for(
                cluster, clusters={"main": main}, tenancy={"pool": {"size": 20, "max_overflow": 0}}
            )
        )
        await router.start()
        routers.append(router)
        return router

    async def raw() -> None:
        async with raw_pool.acquire() as connection:
            await connection.fetchval("SELECT 1")

    def hand_written(maker: async_sessionmaker[Any], *, commit: bool = False) -> Op:
        async def op() -> None:
            async with maker() as session:
                await session.execute(SELECT_1)
                if commit:  # a write unit of work ends with COMMIT
                    await session.commit()

        return op

    def routed(router: SessionRouter, target: Target) -> Op:
        async def op() -> None:
            async with router.session(target) as session:
                await session.execute(SELECT_1)

        return op

    def in_turn(router: SessionRouter, tenants: list[str]) -> Op:
        turns = itertools.cycle([Target(tenant=t, intent="read") for t in tenants])

        async def op() -> None:
            async with router.session(next(turns)) as session:
                await session.execute(SELECT_1)

        return op

    variants: dict[str, Op] = {
        "raw asyncpg pool": raw,
        BASELINE: hand_written(plain_maker),
        CONTROL: hand_written(control_maker),
        "hand-written + pool_pre_ping": hand_written(pinged_maker),
        "router, target replica": routed(await new_router(), Target(intent="read")),
        COMMIT_BASELINE: hand_written(primary_maker, commit=True),
        "router, target primary (COMMIT)": routed(await new_router(), Target()),
        "router, tenant database (read)": routed(
            await new_router(), Target(tenant="acme", intent="read")
        ),
        "router, tenant schema (read)": routed(
            await new_router(), Target(tenant="globex", intent="read")
        ),
        "router, tenant row (read)": routed(
            await new_router(), Target(tenant="initech", intent="read")
        ),
        # Pooled connections change hands between tenants: each pays the session-state reset.
        "router, 3 schema tenants in turn (read)": in_turn(
            await new_router(), ["globex", "soylent", "tyrell"]
        ),
    }

    async def close() -> None:
        await raw_pool.close()
        for engine in (plain, control, pinged, plain_primary):
            await engine.dispose()
        for router in routers:
            await router.dispose()

    return variants, close


async def measure(op: Op, *, ops: int, concurrency: int) -> float:
    """Units of work per second, `ops` in total spread over `concurrency` tasks (also
    `bench.consistency`'s)."""
    return (await measure_with_cpu(op, ops=ops, concurrency=concurrency))[0]


async def measure_with_cpu(op: Op, *, ops: int, concurrency: int) -> tuple[float, float]:
    """Units of work per second, and this process's CPU time (user + system) per unit in µs:
    the client's cost, steadier on a shared VM than the rate (the server's work, on the same
    two cores, is not in it)."""
    per_task = max(1, ops // concurrency)

    async def worker() -> None:
        for _ in range(per_task):
            await op()

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    units = per_task * concurrency
    cpu = (time.process_time() - cpu_started) / units * 1e6
    return units / (time.perf_counter() - started), cpu


@dataclass
class Pairs:
    """One variant's measurements, each beside the one of its baseline taken next to it."""

    rate: Series
    base_rate: Series
    cpu: Series
    base_cpu: Series


async def measure_pairs(
    variants: dict[str, Op], *, rounds: int, ops: int, concurrency: int
) -> dict[str, Pairs]:
    """Every variant but the baseline, in a fresh order each round, measured right after or
    right before its baseline (alternately): the pair shares the machine's state of the moment.
    On this shared VM the rate drifts by tens of percent within seconds, and a baseline
    measured once per round stood up to ten measurements (some 15 s) away from a variant."""
    shuffler = random.Random(20261127)  # the same orders in every run
    pairs = {
        name: Pairs(Series(name), Series(name), Series(name), Series(name))
        for name in variants
        if name != BASELINE
    }
    for round_number in range(rounds):
        order = list(pairs)
        shuffler.shuffle(order)
        for position, name in enumerate(order):
            base = COMPARED_WITH.get(name, BASELINE)
            first_base = (round_number + position) % 2 == 0
            measured = {}
            for which in (base, name) if first_base else (name, base):
                gc.collect()  # no variant pays for garbage that another one left
                measured[which] = await measure_with_cpu(
                    variants[which], ops=ops, concurrency=concurrency
                )
            pair = pairs[name]
            pair.rate.values.append(measured[name][0])
            pair.cpu.values.append(measured[name][1])
            pair.base_rate.values.append(measured[base][0])
            pair.base_cpu.values.append(measured[base][1])
    return pairs


def pairs_table(pairs: dict[str, Pairs]) -> str:
    """A row per variant: its rate, its ratio to the baseline measured next to it, its CPU."""
    rows = []
    for name, pair in pairs.items():
        base = COMPARED_WITH.get(name, BASELINE)
        rows.append(
            (
                name,
                f"{pair.rate.median:,.0f}",
                f"±{pair.rate.spread:.1%}",
                base,
                f"{paired_ratio(pair.rate, pair.base_rate):.3f}",
                middle_half(pair.rate, pair.base_rate),
                f"{pair.cpu.median:,.0f}",
                f"{paired_ratio(pair.cpu, pair.base_cpu):.3f}",
            )
        )
    return table(
        (
            "variant",
            "units/s (median)",
            "spread",
            "compared with (measured next to it)",
            "ratio (median of per-pair ratios)",
            "middle half of per-pair ratios",
            "client CPU µs per unit",
            "CPU ratio",
        ),
        rows,
    )


async def run(
    cluster: DevCluster,
    *,
    rounds: int,
    ops: int,
    only: Sequence[str] = (),
    concurrencies: Sequence[int] = CONCURRENCIES,
) -> str:
    variants, close = await build_variants(cluster)
    if only:  # the chosen variants, with what they are compared with
        chosen = {name for name in variants if any(part in name for part in only)}
        chosen |= {COMPARED_WITH.get(name, BASELINE) for name in chosen}
        variants = {name: op for name, op in variants.items() if name in chosen}
    sections = []
    try:
        for op in variants.values():  # warm every pool and statement cache
            await measure(op, ops=50, concurrency=4)
        for concurrency in concurrencies:
            pairs = await measure_pairs(variants, rounds=rounds, ops=ops, concurrency=concurrency)
            sections.append(
                f"Concurrency {concurrency} ({rounds} rounds x {ops} units of work per "
                "measurement; the baseline was measured next to each variant, "
                f"at {median_base(pairs):,.0f} units/s):\n\n" + pairs_table(pairs)
            )
    finally:
        await close()
    return "\n\n".join(sections)


def median_base(pairs: dict[str, Pairs]) -> float:
    """The baseline's median rate over every measurement of it beside a variant."""
    return statistics.median(
        v
        for name, pair in pairs.items()
        if COMPARED_WITH.get(name, BASELINE) == BASELINE
        for v in pair.base_rate.values
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.overhead", argv, rounds=15, more=_options)
    # 2,000 units: a measurement of 640 at concurrency 16 lasted about 0.13 s, short enough
    # for a probe round or a timer of the VM to move it by several percent.
    rounds, ops = (1, 64) if args.quick else (args.rounds, 2000)
    concurrencies = args.concurrency or CONCURRENCIES
    with bench_cluster() as cluster:
        body = run(cluster, rounds=rounds, ops=ops, only=args.only, concurrencies=concurrencies)
        return publish("Session overhead", asyncio.run(body))


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="only the variants whose name contains TEXT (and their baselines); repeatable",
    )
    parser.add_argument(
        "--concurrency",
        action="append",
        type=int,
        help=f"repeatable; default {' and '.join(map(str, CONCURRENCIES))}",
    )


if __name__ == "__main__":
    main()
