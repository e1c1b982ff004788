"""What the pooler mode costs, and the router behind PgBouncer against pgpool-II.

`python -m bench.pooler [--quick] [--rounds N]`

Part 1, the session micro-benchmark direct and through PgBouncer.
One primary, and one PgBouncer (transaction mode, 20 server connections) in front of it. Units
of work ("open, SELECT 1, close" on the primary) per second, concurrency 16, four variants
measured back to back in a shuffled order each round:
- direct, `pooler = "none"` (the baseline);
- through PgBouncer, `pooler = "pgbouncer-transaction"` (no statement cache, unique names);
- a schema tenant direct (its settings kept on the router's connections: no round trip);
- a schema tenant through PgBouncer (its settings sent inside every transaction).
Ratios are medians of per-round ratios against the direct variant of the same kind.

Part 2, HTTP end to end (the example app under uvicorn, `bench.http`'s harness: keep-alive
connections from a separate process, `GET /items` and `POST /items` of the `acme` tenant):
- direct: the router routes to the primary and the replica itself (the baseline);
- PgBouncer: one PgBouncer per node (transaction mode), `pooler = "pgbouncer-transaction"`,
  the router still choosing primary or replica;
- pgpool-II: one pgpool-II in front of both nodes, balancing reads itself; the router sees
  one node (it cannot route by health or lag, nor read your writes, behind it).
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text

from app.core.config import CONFIG_FILE_ENV
from bench import http
from bench.common import (
    APP_ROLE,
    Series,
    bench_cluster,
    paired_ratio,
    parse_args,
    publish,
    table,
)
from bench.http import SAME_POOL
from bench.overhead import measure
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.devpoolers import PgBouncer, PgpoolII

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


def http_configs(
    cluster: DevCluster, bouncers: list[PgBouncer], pgpool: PgpoolII
) -> dict[str, str]:
    primary, replica = cluster.primary, cluster.replicas[0]
    direct = {"primary": primary, "replica1": replica}
    probe_urls = "\n".join(
        f'{name} = "{cluster.url(node.name, database="app", user=APP_ROLE)}"'
        for name, node in direct.items()
    )
    tenants = '[database.tenants.acme]\nstrategy = "database"\ndatabase = "acme"\n'
    return {
        "direct": (
            "[database.clusters.main]\n"
            f'primary = "{cluster.url(primary.name, database="app", user=APP_ROLE)}"\n'
            f'replicas = ["{cluster.url(replica.name, database="app", user=APP_ROLE)}"]\n' + tenants
        ),
        "PgBouncer per node, pooler mode": (
            "[database.clusters.main]\n"
            f'primary = "{bouncers[0].url("app", APP_ROLE)}"\n'
            f'replicas = ["{bouncers[1].url("app", APP_ROLE)}"]\n'
            'pooler = "pgbouncer-transaction"\n'
            f"[database.clusters.main.probe_urls]\n{probe_urls}\n" + tenants
        ),
        "pgpool-II (balances reads itself)": (
            f'[database.clusters.main]\nprimary = "{pgpool.url("app", APP_ROLE)}"\n' + tenants
        ),
    }


def http_part(cluster: DevCluster, rounds: int, connections: int, duration: float) -> str:
    bouncers = [
        PgBouncer(node.port, pool_size=20, users=(APP_ROLE,))
        for node in (cluster.primary, cluster.replicas[0])
    ]
    pgpool = PgpoolII(cluster.primary.port, [cluster.replicas[0].port])
    try:
        apps = {}
        for name, config in http_configs(cluster, bouncers, pgpool).items():
            path = cluster.base_dir / f"pooler-{len(apps)}.toml"
            path.write_text(config)
            apps[name] = ("app.main:app", {CONFIG_FILE_ENV: str(path), **SAME_POOL})
        results = http.measure(
            cluster, apps, rounds=rounds, connections=connections, duration=duration
        )
    finally:
        pgpool.stop()
        for bouncer in bouncers:
            bouncer.stop()
    return (
        f"{rounds} rounds; {connections} connections for {duration:.1f} s per route; "
        "apps in a rotating order; only 2xx answers count.\n\n" + http.report(results, "direct")
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.pooler", argv, rounds=9)
    rounds, ops = (1, 64) if args.quick else (args.rounds, 1600)
    http_rounds, connections, duration = (1, 4, 0.5) if args.quick else (3, 32, 5.0)
    with bench_cluster(replicas=1) as cluster:
        bouncer = PgBouncer(cluster.primary.port, pool_size=20, users=(APP_ROLE,))
        try:
            body = asyncio.run(run(cluster, bouncer, rounds, ops))
        finally:
            bouncer.stop()
        body += "\n\n" + http_part(cluster, http_rounds, connections, duration)
    return publish("Poolers: the pooler mode's cost, PgBouncer against pgpool-II", body)


if __name__ == "__main__":
    main()
