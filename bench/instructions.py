"""Client CPU instructions per unit of work, counted by valgrind: a figure that does not drift.

Throughput on this shared 2-core VM swings by ±10-20% between runs of the same code; the
instructions the client executes per "open a session, SELECT 1, close" do not (±1% here).
Each variant runs in a process of its own under `valgrind --tool=cachegrind --cache-sim=no`,
twice (a warm-up only, then the warm-up and N units), against the same cluster; the difference
divided by N is what one unit costs, start-up and warm-up cancelled. Every process starts the
same router, so the event loop carries the same background timers in every variant. The
server's work and the time spent waiting for it are not counted: at concurrency 1 about half
of a unit's wall time is the client's CPU, at 16 nearly all of it. Counted at concurrency 1
and 16 (16 tasks, the N units shared among them): the throughput goals are set at both, and at
16 the units interleave in the event loop as they do under load. Nor is the kernel's work
counted (system calls, page faults): `bench.overhead` reports the whole CPU time per unit.

    python -m bench.instructions [--quick] [--units N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench.common import APP_ROLE, bench_cluster, publish, settings_for, table
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target

SELECT_1 = text("SELECT 1")
#: Variant -> the hand-written variant it is compared with.
VARIANTS = {
    "hand-written sessionmaker, replica": None,
    "router, target replica": "hand-written sessionmaker, replica",
    "router, tenant schema (read)": "hand-written sessionmaker, replica",
    "router, tenant row (read)": "hand-written sessionmaker, replica",
    "hand-written, primary, COMMIT": None,
    "router, target primary (COMMIT)": "hand-written, primary, COMMIT",
}
WARM_UP = 50


class _Cluster:
    """Enough of a DevCluster for `settings_for`, from the ports the parent passes on."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.replicas = [_Named("replica1")]

    def url(self, node: str = "primary", *, database: str, user: str) -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.ports[node]}/{database}"


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


#: The concurrencies of the throughput goals (`bench.overhead`).
CONCURRENCY = (1, 16)


async def _run_child(ports: dict[str, int], variant: str, units: int, concurrency: int) -> None:
    cluster = _Cluster(ports)
    replica = cluster.url("replica1", database="app", user=APP_ROLE)
    primary = cluster.url("primary", database="app", user=APP_ROLE)
    pool = {"size": 20, "max_overflow": 0}
    main = {"primary": primary, "replicas": [replica], "pool": pool}
    # A long probe interval: under valgrind the process runs ~50x slower, and probes would
    # count for 50 times their share.
    settings = settings_for(
        cluster,  # type: ignore[arg-type]
        clusters={"main": main},
        tenancy={"pool": pool},
        health={"interval": 3600},
    )
    router = SessionRouter(settings)
    await router.start()
    engine = create_async_engine(primary if "primary" in variant else replica, pool_size=20)
    op = _op(variant, router, async_sessionmaker(engine, expire_on_commit=False))

    async def worker(count: int) -> None:
        for _ in range(count):
            await op()

    try:
        await asyncio.gather(*(worker(WARM_UP // concurrency) for _ in range(concurrency)))
        await asyncio.gather(*(worker(units // concurrency) for _ in range(concurrency)))
    finally:
        await engine.dispose()
        await router.dispose()


def _op(
    variant: str, router: SessionRouter, maker: async_sessionmaker[Any]
) -> Callable[[], Awaitable[None]]:
    if variant.startswith("hand-written"):
        commit = "COMMIT" in variant

        async def hand_written() -> None:
            async with maker() as session:
                await session.execute(SELECT_1)
                if commit:
                    await session.commit()

        return hand_written
    target = {
        "router, target replica": Target(intent="read"),
        "router, tenant schema (read)": Target(tenant="globex", intent="read"),
        "router, tenant row (read)": Target(tenant="initech", intent="read"),
        "router, target primary (COMMIT)": Target(),
    }[variant]

    async def routed() -> None:
        async with router.session(target) as session:
            await session.execute(SELECT_1)

    return routed


def _count(
    ports: dict[str, int], variant: str, units: int, concurrency: int, *, valgrind: bool
) -> int:
    child = [sys.executable, "-m", "bench.instructions", "--child", json.dumps(ports), variant]
    command = [*child, str(units), str(concurrency)]
    if valgrind:
        command = [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            *command,
        ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    return int(found.group(1).replace(",", "")) if found else 0


def run(ports: dict[str, int], units: int, *, valgrind: bool) -> str:
    variants = VARIANTS if valgrind else dict(list(VARIANTS.items())[:2])  # quick: keep it short
    sections = []
    for concurrency in CONCURRENCY:
        shared = max(1, units // concurrency) * concurrency  # every task the same share
        per_unit: dict[str, float] = {}
        for variant in variants:
            warm_only = _count(ports, variant, 0, concurrency, valgrind=valgrind)
            measured = _count(ports, variant, shared, concurrency, valgrind=valgrind)
            per_unit[variant] = (measured - warm_only) / shared
        rows = []
        for variant, baseline in variants.items():
            base = per_unit[baseline] if baseline else per_unit[variant]
            ratio = per_unit[variant] / base if base else float("nan")
            rows.append(
                (variant, f"{per_unit[variant]:,.0f}", baseline or "(baseline)", f"{ratio:.3f}")
            )
        sections.append(
            f"Concurrency {concurrency}, {shared} units after "
            f"{WARM_UP // concurrency * concurrency} of warm-up; "
            "instructions executed by the client process (valgrind cachegrind):\n\n"
            + table(("variant", "instructions per unit", "compared with", "ratio"), rows)
        )
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--quick", action="store_true", help="run each variant once, natively")
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--child", nargs=4, metavar=("PORTS", "VARIANT", "UNITS", "TASKS"))
    args = parser.parse_args(argv)
    if args.child:
        ports, variant, units, concurrency = args.child
        asyncio.run(_run_child(json.loads(ports), variant, int(units), int(concurrency)))
        return ""
    valgrind = not args.quick and shutil.which("valgrind") is not None
    with bench_cluster(replicas=1) as cluster:
        ports = {name: node.port for name, node in cluster.nodes.items()}
        body = run(ports, 5 if args.quick else args.units, valgrind=valgrind)
    if not valgrind:
        body = "Not counted (`--quick`, or valgrind is not installed): the variants ran once.\n"
    return publish("Client instructions per unit of work", body)


if __name__ == "__main__":
    main()
