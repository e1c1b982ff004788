"""Failover: what a dying node costs the readers and writers of one process.

Under a read load of 20 concurrent tasks against the replicas:
- kill a replica (immediate shutdown, like a crash): failed reads, time until it is ejected,
  and after restarting it, time until it is re-admitted and serves reads again;
- the baseline, measured in the same run: a hand-written round-robin over one engine per
  replica, no health checks and no retry (what a team writes before adopting a router);
- kill the primary: failed reads (should be none), writes refused while it is down, and the time
  from its restart to the first successful write.

Default settings (health interval 1 s). `python -m bench.failover [--quick] [--rounds N]`
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench.common import (
    APP_ROLE,
    Series,
    bench_cluster,
    parse_args,
    publish,
    settings_for,
    table,
)
from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.faults import WHO_ANSWERS, ReadLoad, eventually

READERS = 20


async def replica_kill(
    cluster: DevCluster, *, outage: float, replay: bool = True
) -> dict[str, float]:
    router = SessionRouter(settings_for(cluster))
    await router.start()
    port = cluster.nodes["replica1"].port
    health = router.monitor.servers[f"127.0.0.1:{port}"]
    try:
        async with ReadLoad(router, tasks=READERS, replay=replay) as load:
            await eventually(lambda: load.ports[port] > 50, within=10, what="warm-up")
            stopped = time.monotonic()
            await asyncio.to_thread(cluster.stop_node, "replica1")
            await eventually(lambda: not health.up, within=10, what="ejection")
            to_eject = time.monotonic() - stopped  # from the moment the crash began
            await asyncio.sleep(outage)
            await asyncio.to_thread(cluster.start_node, "replica1")
            restarted = time.monotonic()
            to_admit = await eventually(lambda: health.up, within=30, what="re-admission")
            await eventually(
                lambda: load.served_by(port, after=restarted),
                within=30,
                what="reads on the restarted replica",
            )
            to_serve = time.monotonic() - restarted
    finally:
        await router.dispose()
    await asyncio.to_thread(cluster.wait_streaming)
    return {
        "reads": load.total,
        "failed": len(load.failures),
        "eject_s": to_eject,
        "readmit_s": to_admit,
        "serve_s": to_serve,
    }


async def naive_replica_kill(cluster: DevCluster, *, outage: float) -> dict[str, float]:
    """Baseline: one engine per replica, round-robin, no health, no retry."""
    engines = [
        create_async_engine(
            cluster.url(n.name, database="app", user=APP_ROLE), connect_args={"timeout": 2}
        )
        for n in cluster.replicas
    ]
    makers = itertools.cycle([async_sessionmaker(e) for e in engines])
    reads = failed = 0
    stopping = False

    async def reader() -> None:
        nonlocal reads, failed
        while not stopping:
            try:
                async with next(makers)() as session:
                    await session.scalar(WHO_ANSWERS)
                reads += 1
            except Exception:  # the baseline's failures are the figure
                failed += 1
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(reader()) for _ in range(READERS)]
    await asyncio.sleep(0.5)
    await asyncio.to_thread(cluster.stop_node, "replica1")
    await asyncio.sleep(outage)
    await asyncio.to_thread(cluster.start_node, "replica1")
    await asyncio.sleep(1.0)
    stopping = True
    await asyncio.gather(*tasks)
    for engine in engines:
        await engine.dispose()
    await asyncio.to_thread(cluster.wait_streaming)
    return {"reads": reads, "failed": failed}


async def primary_kill(cluster: DevCluster, *, outage: float) -> dict[str, float]:
    router = SessionRouter(settings_for(cluster))
    await router.start()
    writes = {"ok": 0, "refused": 0}

    async def write_once() -> bool:
        try:
            async with router.session() as session:
                await session.execute(text("SELECT txid_current()"))
        except DatabaseUnavailableError:
            writes["refused"] += 1
            return False
        writes["ok"] += 1
        return True

    try:
        async with ReadLoad(router, tasks=READERS) as load:
            await write_once()
            await asyncio.to_thread(cluster.stop_node, "primary")
            refused_started = time.monotonic()
            await write_once()  # waits out the retry deadline, then 503
            refusal_s = time.monotonic() - refused_started
            await asyncio.sleep(outage)
            await asyncio.to_thread(cluster.start_node, "primary")
            first_write = await eventually(write_once, within=30, what="a write after restart")
    finally:
        await router.dispose()
    await asyncio.to_thread(cluster.wait_streaming)
    return {
        "reads": load.total,
        "failed_reads": len(load.failures),
        "refusal_s": refusal_s,
        "first_write_s": first_write,
    }


def summarize(rounds: list[dict[str, float]], key: str) -> Series:
    return Series(key, [r[key] for r in rounds])


async def run(cluster: DevCluster, *, rounds: int, outage: float) -> str:
    replica = [await replica_kill(cluster, outage=outage) for _ in range(rounds)]
    plain = [await replica_kill(cluster, outage=outage, replay=False) for _ in range(rounds)]
    naive = [await naive_replica_kill(cluster, outage=outage) for _ in range(rounds)]
    primary = [await primary_kill(cluster, outage=outage) for _ in range(rounds)]

    def fmt(series: Series, unit: str = "") -> str:
        return f"{series.median:.2f}{unit} (±{series.spread:.0%})"

    def router_row(name: str, series: list[dict[str, float]]) -> tuple[Any, ...]:
        return (
            name,
            f"{summarize(series, 'reads').median:,.0f}",
            f"{summarize(series, 'failed').median:.0f}",
            fmt(summarize(series, "eject_s"), " s"),
            fmt(summarize(series, "readmit_s"), " s"),
            fmt(summarize(series, "serve_s"), " s"),
        )

    replica_rows: list[tuple[Any, ...]] = [
        router_row("router.run, replays (health interval 1 s)", replica),
        router_row("router.session, as get_db reads (statement replay only)", plain),
        (
            "baseline: round-robin engines, no health/retry",
            f"{summarize(naive, 'reads').median:,.0f}",
            f"{summarize(naive, 'failed').median:.0f}",
            "never",
            "n/a",
            "n/a",
        ),
    ]
    primary_rows = [
        (
            f"{summarize(primary, 'reads').median:,.0f}",
            f"{summarize(primary, 'failed_reads').median:.0f}",
            fmt(summarize(primary, "refusal_s"), " s"),
            fmt(summarize(primary, "first_write_s"), " s"),
        )
    ]
    return (
        f"Replica killed for {outage:.0f} s under {READERS} concurrent readers "
        f"(median of {rounds} rounds):\n\n"
        + table(
            (
                "variant",
                "reads",
                "failed reads",
                "time to eject",
                "time to re-admit",
                "restart to first read on it",
            ),
            replica_rows,
        )
        + f"\n\nPrimary killed for {outage:.0f} s under {READERS} concurrent readers:\n\n"
        + table(
            (
                "reads",
                "failed reads",
                "a write while down fails after",
                "first successful write after restart",
            ),
            primary_rows,
        )
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.failover", argv, rounds=3)
    rounds, outage = (1, 1.0) if args.quick else (args.rounds, 3.0)
    with bench_cluster() as cluster:
        return publish("Failover", asyncio.run(run(cluster, rounds=rounds, outage=outage)))


if __name__ == "__main__":
    main()
