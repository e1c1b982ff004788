"""The seed's public face: `get_db_context`, `engine`, `async_session_maker`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from app.db import session as public
from app.db.session import get_db_context
from app.models import Item
from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster, free_port
from tests.support.faults import eventually

from .conftest import APP_ROLE, database_settings

ROOT = Path(__file__).resolve().parent.parent


async def count_items(name: str) -> int:
    async with get_db_context() as session:
        return (await session.scalar(select(func.count()).where(Item.name == name))) or 0


def checked_out(router: SessionRouter) -> int:
    return sum(node.pool_status()["in_use"] for node in router.clusters["main"].nodes)


async def test_commits_on_success(router: SessionRouter) -> None:
    async with get_db_context() as session:
        session.add(Item(name="committed"))
    assert await count_items("committed") == 1


async def test_rolls_back_on_error_and_reraises(router: SessionRouter) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with get_db_context() as session:
            session.add(Item(name="rolled-back"))
            await session.flush()
            raise RuntimeError("boom")
    assert await count_items("rolled-back") == 0


async def test_failed_commit_raises_and_keeps_nothing(router: SessionRouter) -> None:
    with pytest.raises(IntegrityError, match="deferred_unique"):
        async with get_db_context() as session:
            await session.execute(text("INSERT INTO deferred_check VALUES (7), (7)"))
    async with get_db_context() as session:
        assert await session.scalar(text("SELECT count(*) FROM deferred_check WHERE x = 7")) == 0


async def test_connection_is_returned_on_success_error_and_cancellation(
    router: SessionRouter,
) -> None:
    async with get_db_context("replica") as session:
        await session.execute(text("SELECT 1"))
        assert checked_out(router) == 1
    assert checked_out(router) == 0

    with pytest.raises(ValueError, match="x"):
        async with get_db_context() as session:
            await session.execute(text("SELECT 1"))
            raise ValueError("x")
    assert checked_out(router) == 0

    for with_token in (False, True):  # COMMIT (and the token's query) share a hop with close
        async with router.session(consistency_token=with_token) as session:
            item = Item(name="returned")
            session.add(item)
        assert checked_out(router) == 0
        assert inspect(item).detached  # closed: no lazy load can check out a connection later
        assert ("consistency_token" in session.info) is with_token

    with pytest.raises(IntegrityError, match="deferred_unique"):  # the COMMIT itself fails
        async with router.session(consistency_token=True) as session:
            await session.execute(text("INSERT INTO deferred_check VALUES (8), (8)"))
    assert checked_out(router) == 0
    assert "consistency_token" not in session.info

    started = asyncio.Event()

    async def slow_query() -> None:
        async with get_db_context() as session:
            started.set()
            await session.execute(text("SELECT pg_sleep(10)"))

    task = asyncio.create_task(slow_query())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert checked_out(router) == 0


async def test_engine_and_session_maker_are_the_default_primary(
    router: SessionRouter, pg: DevCluster
) -> None:
    assert public.engine is router.default_cluster.primary.engine
    async with public.async_session_maker() as session:
        port = await session.scalar(text("SELECT inet_server_port()"))
        assert port == pg.primary.port


async def test_unreachable_server_fails_fast_with_database_unavailable(
    migrated: DevCluster,
) -> None:
    closed = f"postgresql+asyncpg://app@127.0.0.1:{free_port()}/app"
    settings = database_settings(migrated, clusters={"main": {"primary": closed}}, tenants={})
    router = SessionRouter(settings)
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailableError, match=r"main\.primary"):
            async with router.session() as session:  # checks out on its first statement
                await session.execute(text("SELECT 1"))
    finally:
        await router.dispose()
    assert time.monotonic() - started < settings.connect_timeout + settings.retry.deadline + 1


def test_import_opens_no_connection_and_reads_no_config(tmp_path: Path) -> None:
    """Import with an unreachable server and a config file that does not exist."""
    env = {
        **os.environ,
        "APP_CONFIG_FILE": str(tmp_path / "missing.toml"),
        "APP_DATABASE__CLUSTERS__MAIN__PRIMARY": f"postgresql://x@127.0.0.1:{free_port()}/x",
    }
    code = (
        "import app.db.session as s, app.main, sqlalchemy.pool as p\n"
        "assert s.provider.current is None\n"
        "print('imported')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


async def test_reads_cancelled_at_any_moment_leave_no_connection_behind(
    router: SessionRouter, pg: DevCluster
) -> None:
    """Reads cancelled at every moment of their life (routing, statement, the closing
    ROLLBACK) leave no connection checked out and no server backend beyond the pools, and the
    pool serves on."""

    async def read() -> None:
        async with router.session("replica") as session:
            await session.execute(text("SELECT 1"))

    spread = random.Random(20261129)
    for _ in range(300):
        task = asyncio.create_task(read())
        await asyncio.sleep(spread.uniform(0, 0.003))  # about one read's length
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert checked_out(router) == 0
    pool = router.settings.clusters["main"].pool
    most = pool.size + pool.max_overflow + 1  # the pool's connections and the health probe's
    backends = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'session-router:%'"
    )
    for node in pg.replicas:

        async def nothing_left_over(name: str = node.name) -> bool:
            # A terminated backend leaves pg_stat_activity a moment after its socket closes.
            return int(await asyncio.to_thread(pg.sql, name, backends)) <= most

        await eventually(nothing_left_over, within=5, what=f"no backend left over on {node.name}")
    for _ in range(20):  # and it serves on
        await read()
    assert checked_out(router) == 0


async def test_an_exhausted_pool_is_a_503_not_a_500(migrated: DevCluster) -> None:
    """Sessions check out on their first statement, so a pool with no free connection
    within `pool.timeout` shows there: a DatabaseUnavailableError (503 with Retry-After), not
    SQLAlchemy's TimeoutError (a 500), for reads and writes alike."""
    settings = database_settings(
        migrated,
        replicas=False,
        clusters={
            "main": {
                "primary": migrated.url(database="app", user=APP_ROLE),
                "pool": {"size": 1, "max_overflow": 0, "timeout": 0.2},
            }
        },
        tenants={},
    )
    router = SessionRouter(settings)
    try:
        async with router.session() as holder:
            await holder.execute(text("SELECT 1"))  # the pool's one connection, held
            for target in ("primary", "replica"):
                with pytest.raises(DatabaseUnavailableError, match="pool"):
                    async with router.session(target) as session:
                        await session.execute(text("SELECT 1"))
        async with router.session() as session:  # and the pool serves on
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await router.dispose()
