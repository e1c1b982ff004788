"""Moving a tenant online between two clusters: how long, how long its writes pause, and
what the move costs the other tenants.

`python -m bench.move [--quick]`

Two dev clusters (primary + one replica each). A schema tenant with 100k, then 1M rows on the
first is moved to the second (`pg_session_router.db.moves.move_tenant`, what
`python -m app tenants move` runs) while four clients write to it (one INSERT per unit of
work, back to back) and four clients write to another tenant of the first cluster. Figures:
- the move's wall time and the write pause it reports (writes held, catalog switch);
- the latency of the moving tenant's writes that started during the switch (p50, p99, max)
  against its writes before the move (p50): what a client saw;
- writes refused (503) and write errors (must be 0);
- the other tenant's write throughput during the move, relative to before it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from app.models import Base
from bench.common import APP_ROLE, bench_cluster, parse_args, publish, table
from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import moves, provisioning
from pg_session_router.db.migrate import create_all_migrator, migrate
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

CLIENTS = 4
INSERT = text("INSERT INTO items (name) VALUES ('x')")


def two_clusters(main: DevCluster, second: DevCluster) -> DatabaseSettings:
    def cluster(pg: DevCluster) -> dict[str, Any]:
        return {
            "primary": pg.url(database="app", user=APP_ROLE),
            "replicas": [pg.url(n.name, database="app", user=APP_ROLE) for n in pg.replicas],
            "admin": pg.url(database="app"),
        }

    return DatabaseSettings.model_validate(
        {
            "clusters": {"main": cluster(main), "second": cluster(second)},
            "tenants": {"globex": {"strategy": "schema"}},
        }
    )


@dataclass
class Writes:
    """One tenant's writes: (start time, latency s) of each, refusals and errors."""

    done: list[tuple[float, float]] = field(default_factory=list)
    refused: int = 0
    errors: int = 0

    def rate(self, start: float, end: float) -> float:
        return sum(1 for at, _ in self.done if start <= at < end) / (end - start)

    def latencies_ms(self, start: float, end: float) -> list[float]:
        return [lat * 1000 for at, lat in self.done if start <= at < end]


async def write_loop(
    router: SessionRouter, tenant: str, writes: Writes, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with router.session(tenant=tenant) as session:
                await session.execute(INSERT)
            writes.done.append((started, time.monotonic() - started))
        except DatabaseUnavailableError:
            writes.refused += 1
        except Exception:
            writes.errors += 1


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def move_once(settings: DatabaseSettings, rows: int, before_s: float) -> list[str]:
    serving, operator = SessionRouter(settings), SessionRouter(settings)
    await serving.start()
    tenant = f"bench-mv-{uuid.uuid4().hex[:6]}"
    try:
        await provisioning.add_tenant(
            operator, tenant, TenantSettings(strategy="schema"), metadata=Base.metadata
        )
        async with operator.session(tenant=tenant) as session:
            await session.execute(
                text("INSERT INTO items (name) SELECT 'seed' FROM generate_series(1, :n)"),
                {"n": rows},
            )
        moving, other, stop = Writes(), Writes(), asyncio.Event()
        clients = [
            *(
                asyncio.create_task(write_loop(serving, tenant, moving, stop))
                for _ in range(CLIENTS)
            ),
            *(
                asyncio.create_task(write_loop(serving, "globex", other, stop))
                for _ in range(CLIENTS)
            ),
        ]
        began = time.monotonic()
        await asyncio.sleep(before_s)  # the "before" window: a measurement, not a wait
        switching: list[float] = []

        def seen(progress: moves.MoveProgress) -> None:
            if progress.phase == "switching" and not switching:
                switching.append(time.monotonic())

        move_started = time.monotonic()
        report = await moves.move_tenant(
            operator,
            tenant,
            "second",
            migrator=create_all_migrator(Base.metadata),
            on_progress=seen,
        )
        move_ended = time.monotonic()
        stop.set()
        await asyncio.gather(*clients)
        before = moving.latencies_ms(began, move_started)
        during_switch = moving.latencies_ms(switching[0], move_ended) if switching else []
        other_ratio = other.rate(move_started, move_ended) / other.rate(began, move_started)
        await moves.drop_moved(operator, tenant)
        await provisioning.remove_tenant(operator, tenant, drop=True)
        return [
            f"{rows:,}",
            f"{report.seconds:.1f}",
            f"{report.write_pause_ms}",
            f"{statistics.median(before):.1f}",
            f"{statistics.median(during_switch):.1f} / {quantile(during_switch, 0.99):.1f} / "
            f"{max(during_switch):.1f}"
            if during_switch
            else "-",
            f"{moving.refused} / {moving.errors + other.errors}",
            f"{other_ratio:.2f}x",
        ]
    finally:
        await serving.dispose()
        await operator.dispose()


async def measure(main: DevCluster, second: DevCluster, sizes: list[int], before_s: float) -> str:
    settings = two_clusters(main, second)
    router = SessionRouter(settings)
    try:
        await migrate(router, Base.metadata)  # the catalog and globex on main
    finally:
        await router.dispose()
    rows = [await move_once(settings, size, before_s) for size in sizes]
    headers = [
        "rows",
        "move, s",
        "write pause (reported), ms",
        "write before, ms p50",
        "writes during the switch, ms p50 / p99 / max",
        "refused (503) / errors",
        "other tenant's writes during / before",
    ]
    return table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    args = parse_args("python -m bench.move", argv, rounds=1)
    sizes, before_s = ([1_000], 0.5) if args.quick else ([100_000, 1_000_000], 3.0)
    with bench_cluster(replicas=1) as main_cluster, DevCluster(replicas=1) as second:
        second.create_role(APP_ROLE, createdb=True)
        second.create_database("app", owner=APP_ROLE)
        body = asyncio.run(measure(main_cluster, second, sizes, before_s))
    return publish("Online tenant move", body)


if __name__ == "__main__":
    main()
