"""What every benchmark shares: a dev cluster with the example schema, settings, statistics,
and the machine description printed next to the figures."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from app.models import Base
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.devcluster import DevCluster, find_bindir

APP_ROLE = "app"
TENANT_DATABASES = ("acme",)


@contextmanager
def bench_cluster(replicas: int = 2) -> Iterator[DevCluster]:
    """A dev cluster with the `app` role, the example databases, and migrated tables."""
    import asyncio

    from pg_session_router.db.migrate import migrate
    from pg_session_router.db.router import SessionRouter

    with DevCluster(replicas=replicas) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        for database in ("app", *TENANT_DATABASES):
            cluster.create_database(database, owner=APP_ROLE)

        async def run_migrations() -> None:
            router = SessionRouter(settings_for(cluster))
            try:
                await migrate(router, Base.metadata)
            finally:
                await router.dispose()

        asyncio.run(run_migrations())
        cluster.wait_replayed()
        yield cluster


def settings_for(cluster: DevCluster, **overrides: Any) -> DatabaseSettings:
    config: dict[str, Any] = {
        "clusters": {
            "main": {
                "primary": cluster.url(database="app", user=APP_ROLE),
                "replicas": [
                    cluster.url(n.name, database="app", user=APP_ROLE) for n in cluster.replicas
                ],
            }
        },
        "tenants": {
            "acme": {"strategy": "database", "database": "acme"},
            "globex": {"strategy": "schema"},
            "soylent": {"strategy": "schema"},
            "tyrell": {"strategy": "schema"},
            "initech": {"strategy": "row"},
        },
    }
    config.update(overrides)
    return DatabaseSettings.model_validate(config)


@dataclass
class Series:
    """Repeated measurements of one figure."""

    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> float:
        """Half the range between the lowest and highest round, relative to the median."""
        if len(self.values) < 2 or not self.median:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / self.median


def round_ratios(series: Series, base: Series) -> list[float]:
    """Each round's figure against the baseline's in the same round, so that drift of the
    machine between rounds (large on a shared VM) cancels."""
    return [v / b for v, b in zip(series.values, base.values, strict=True)]


def paired_ratio(series: Series, base: Series) -> float:
    """The median of round-by-round ratios (`round_ratios`)."""
    return statistics.median(round_ratios(series, base))


def middle_half(series: Series, base: Series) -> str:
    """The range of the middle half of the round-by-round ratios (first to third quartile):
    how far apart two runs' medians may land, to read a ratio's distance from a goal by."""
    ratios = round_ratios(series, base)
    if len(ratios) < 2:
        return "-"
    first, _, third = statistics.quantiles(ratios, n=4)
    return f"{first:.3f}-{third:.3f}"


def machine() -> str:
    postgres = find_bindir() / "postgres"
    version = subprocess.run(
        [str(postgres), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return (
        f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"{version}"
    )


def parse_args(
    prog: str,
    argv: list[str] | None,
    *,
    rounds: int,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes: `--quick` (one tiny round, for CI) and `--rounds`;
    `more` adds a benchmark's own."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--quick", action="store_true", help="one tiny round (CI smoke run)")
    parser.add_argument("--rounds", type=int, default=rounds)
    if more is not None:
        more(parser)
    return parser.parse_args(argv)


def publish(title: str, body: str) -> str:
    """A RESULTS.md section: printed, and returned for `python -m bench` to collect."""
    out = f"## {title}\n\nMachine: {machine()}\n\n{body}\n"
    print(out)
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
