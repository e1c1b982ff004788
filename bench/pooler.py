"""What the pooler mode costs: the session micro-benchmark direct and through PgBouncer.

`python -m bench.pooler [--quick] [--rounds N]`

One primary, and one PgBouncer (transaction mode, 20 server connections) in front of it. Units
of work ("open, SELECT 1, close" on the primary) per second, concurrency 16, four variants
measured back to back in a shuffled order each round:
- direct, `pooler = "none"` (the baseline);
- through PgBouncer, `pooler = "pgbouncer-transaction"` (no statement cache, unique names);
- a schema tenant direct (its settings kept on the router's connections: no round trip);
- a schema tenant through PgBouncer (its settings sent inside every transaction).
Ratios are medians of per-round ratios against the direct variant of the same kind.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text

from bench.common import (
    APP_ROLE,
    Series,
    bench_cluster,
    paired_ratio,
    parse_args,
    publish,
    table,
)
from bench.overhead import measure
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.devpoolers import PgBouncer

SELECT_1 = text("SELECT 1")
CONCURRENCY = 16


def settings(url: str, pooler: str, probe: str) -> DatabaseSettings:
    main: dict[str, Any] = {"primary": url, "pooler": pooler, "pool": {"size": 16}}
    if pooler != "none":
        main["probe_urls"] = {"primary": probe}
    return DatabaseSettings.model_validate(
        {"clusters": {"main": main}, "tenants": {"globex": {"strategy": "schema"}}}
    )


def unit(router: SessionRouter, tenant: str | None) -> Callable[[], Awaitable[None]]:
    async def op() -> None:
        async with router.session(tenant=tenant) as session:
            await session.execute(SELECT_1)

    return op


async def run(cluster: DevCluster, bouncer: PgBouncer, rounds: int, ops: int) -> str:
    direct_url = cluster.url(database="app", user=APP_ROLE)
    direct = SessionRouter(settings(direct_url, "none", direct_url))
    pooled = SessionRouter(
        settings(bouncer.url("app", APP_ROLE), "pgbouncer-transaction", direct_url)
    )
    variants = {
        "direct": unit(direct, None),
        "PgBouncer, pooler mode": unit(pooled, None),
        "schema tenant, direct": unit(direct, "globex"),
        "schema tenant, PgBouncer": unit(pooled, "globex"),
    }
    try:
        for op in variants.values():
            await measure(op, ops=64, concurrency=4)  # warm pools
        series = {name: Series(name) for name in variants}
        shuffler = random.Random(20261129)
        for _ in range(rounds):
            order = list(variants.items())
            shuffler.shuffle(order)
            for name, op in order:
                gc.collect()
                series[name].values.append(await measure(op, ops=ops, concurrency=CONCURRENCY))
    finally:
        await direct.dispose()
        await pooled.dispose()
    base = {
        name: series["schema tenant, direct" if "tenant" in name else "direct"] for name in series
    }
    rows = [
        [
            name,
            f"{s.median:,.0f}",
            f"±{s.spread:.0%}",
            f"{paired_ratio(s, base[name]):.2f}x",
        ]
        for name, s in series.items()
    ]
    headers = ["variant (concurrency 16)", "units of work/s", "spread", "vs direct"]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.pooler", argv, rounds=9)
    rounds, ops = (1, 64) if args.quick else (args.rounds, 1600)
    with bench_cluster(replicas=0) as cluster:
        bouncer = PgBouncer(cluster.primary.port, pool_size=20, users=(APP_ROLE,))
        try:
            body = asyncio.run(run(cluster, bouncer, rounds, ops))
        finally:
            bouncer.stop()
    return publish("Pooler mode (PgBouncer, transaction pooling)", body)


if __name__ == "__main__":
    main()
