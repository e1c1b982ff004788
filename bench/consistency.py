"""Read-your-writes strategies on one write/read mix, and what observability costs.

`python -m bench.consistency [--quick] [--rounds N]`

Part 1. Clients of one tenant each loop: write an item, then read it back three times, 5 ms
apart. Per strategy: the share of reads served by replicas, read latency (p50, p99) and stale
reads (a read that missed the client's own write):
- none: plain replica reads (what a router without read-your-writes does),
- tokens: the read carries its write's consistency token,
- tokens + a 20 ms bounded wait on a replica (`routing.max_wait_for_replica`),
- server-side memory: the tenant's last commit position, whoever wrote it,
- a fixed 2 s primary window after the client's own write (Rails, django-multidb-router).
Replay on one of the two replicas is paused throughout (a lagging replica).

Part 2. The session micro-benchmark ("open, SELECT 1, close" on a replica, concurrency 16)
with no observer, with Prometheus metrics, and with metrics + OpenTelemetry spans (an SDK
tracer provider recording every span, exporting none), paired round by round.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from bench.common import (
    Series,
    bench_cluster,
    paired_ratio,
    parse_args,
    publish,
    settings_for,
    table,
)
from bench.overhead import measure
from pg_session_router.db.consistency import ConsistencyToken, LastWrites
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

TENANT = "globex"
CLIENTS = 8
READS_PER_WRITE = 3
READ_GAP = 0.005
WINDOW = 2.0
INSERT = text("INSERT INTO items (name) VALUES (:name)")
FIND = text("SELECT count(*) FROM items WHERE name = :name")


@dataclass
class Tally:
    reads: int = 0
    on_replicas: int = 0
    stale: int = 0
    latencies: list[float] = field(default_factory=list)

    def row(self, name: str) -> list[str]:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        return [
            name,
            f"{self.reads:,}",
            f"{self.on_replicas / max(1, self.reads):.1%}",
            f"{statistics.median(ordered) * 1000:.2f}" if ordered else "-",
            f"{p99 * 1000:.2f}",
            str(self.stale),
        ]


class Strategy:
    """How a client's read after its write is targeted."""

    def __init__(self, name: str, router: SessionRouter) -> None:
        self.name = name
        self.router = router
        self.memory = LastWrites()

    def after_write(self, token: ConsistencyToken) -> None:
        self.memory.record(TENANT, token)

    def read_args(self, token: ConsistencyToken, written_at: float) -> dict[str, Any]:
        if self.name.startswith("tokens"):
            return {"after": token}
        if self.name == "server-side memory":
            return {"after": self.memory.get(TENANT)}
        if self.name.startswith("fixed") and time.monotonic() - written_at < WINDOW:
            return {"target": "primary"}
        return {}


async def client(strategy: Strategy, tally: Tally, until: float) -> None:
    router = strategy.router
    while time.monotonic() < until:
        name = f"c-{uuid.uuid4().hex[:10]}"
        async with router.session(tenant=TENANT, consistency_token=True) as session:
            await session.execute(INSERT, {"name": name})
        token = session.info["consistency_token"]
        strategy.after_write(token)
        written_at = time.monotonic()
        for _ in range(READS_PER_WRITE):
            await asyncio.sleep(READ_GAP)
            args = strategy.read_args(token, written_at)
            started = time.perf_counter()
            async with router.session(tenant=TENANT, read_only=True, **args) as session:
                found = await session.scalar(FIND, {"name": name})
            tally.latencies.append(time.perf_counter() - started)
            tally.reads += 1
            tally.on_replicas += ".replica" in session.info["node"]
            tally.stale += not found


STRATEGIES = (
    "none",
    "tokens",
    "tokens + 20 ms wait",
    "server-side memory",
    "fixed 2 s primary window",
)


async def mix(cluster: DevCluster, seconds: float) -> str:
    tallies = {name: Tally() for name in STRATEGIES}
    cluster.pause_replay("replica2")
    try:
        for name in random.sample(STRATEGIES, len(STRATEGIES)):
            wait = 0.02 if "wait" in name else 0.0
            router = SessionRouter(settings_for(cluster, routing={"max_wait_for_replica": wait}))
            await router.start()
            try:
                strategy = Strategy(name, router)
                until = time.monotonic() + seconds
                await asyncio.gather(
                    *(client(strategy, tallies[name], until) for _ in range(CLIENTS))
                )
            finally:
                await router.dispose()
    finally:
        cluster.resume_replay("replica2")
    headers = ["strategy", "reads", "on replicas", "p50 ms", "p99 ms", "stale reads"]
    return (
        f"{CLIENTS} clients of one tenant, each: write, then {READS_PER_WRITE} reads "
        f"{READ_GAP * 1000:.0f} ms apart, {seconds:.0f} s per strategy; replay paused on "
        "replica2 throughout (it stops receiving reads once too far behind).\n\n"
        + table(headers, [tallies[name].row(name) for name in STRATEGIES])
    )


async def observer_cost(cluster: DevCluster, rounds: int, ops: int) -> str:
    from opentelemetry.sdk.trace import TracerProvider

    from pg_session_router.observability.metrics import RouterMetrics
    from pg_session_router.observability.tracing import RouterTracing

    routers = {name: SessionRouter(settings_for(cluster)) for name in OBSERVED}
    RouterMetrics(routers["metrics"])
    RouterMetrics(routers["metrics + tracing"])
    RouterTracing(routers["metrics + tracing"], tracer_provider=TracerProvider())
    ops_of: dict[str, Callable[[], Awaitable[Any]]] = {
        name: _replica_unit(router) for name, router in routers.items()
    }
    series = {name: Series(name) for name in OBSERVED}
    try:
        for op in ops_of.values():
            await measure(op, ops=64, concurrency=4)
        for _ in range(rounds):
            for name in random.sample(OBSERVED, len(OBSERVED)):
                series[name].values.append(await measure(ops_of[name], ops=ops, concurrency=16))
    finally:
        for router in routers.values():
            await router.dispose()
    base = series["no observer"]
    rows = [
        [name, f"{s.median:,.0f}", f"±{s.spread:.1%}", f"{paired_ratio(s, base):.3f}"]
        for name, s in series.items()
    ]
    headers = [
        "router",
        "units/s (median)",
        "spread",
        "vs no observer (median of per-round ratios)",
    ]
    return (
        f"Open, SELECT 1, close on a replica, concurrency 16, {rounds} rounds x {ops} units.\n\n"
        + table(headers, rows)
    )


OBSERVED = ("no observer", "metrics", "metrics + tracing")


def _replica_unit(router: SessionRouter) -> Callable[[], Awaitable[Any]]:
    async def unit() -> None:
        async with router.session("replica") as session:
            await session.execute(text("SELECT 1"))

    return unit


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.consistency", argv, rounds=15)
    seconds, rounds, ops = (1.0, 1, 64) if args.quick else (8.0, args.rounds, 640)
    with bench_cluster() as cluster:
        body = asyncio.run(mix(cluster, seconds))
        body += "\n\n" + asyncio.run(observer_cost(cluster, rounds, ops))
    return publish("Read-your-writes and observability", body)


if __name__ == "__main__":
    main()
