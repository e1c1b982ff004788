"""Online tenant moves between two clusters, under load: nothing lost, nothing duplicated, no
read error, each write committed on exactly one side or refused with 503; abortable and
refused while another move of the tenant runs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from app.models import Base
from pg_session_router.core.errors import (
    DatabaseUnavailableError,
    MoveError,
    TenantConflictError,
    TenantMovingError,
)
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import logical_copy, moves, provisioning
from pg_session_router.db.migrate import create_all_migrator
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import APP_ROLE, two_cluster_config
from tests.support.cli import run_app, toml_of
from tests.support.faults import eventually
from tests.support.routers import listening_router

SEED_ROWS = 500
CHECKSUM = "SELECT count(*), coalesce(sum(hashtext(id::text || name)), 0) FROM items"


def settings(main: DevCluster, second: DevCluster, **overrides: Any) -> DatabaseSettings:
    return DatabaseSettings.model_validate({**two_cluster_config(main, second), **overrides})


@pytest.fixture
async def serving(migrated: DevCluster, migrated_two: DevCluster) -> AsyncIterator[SessionRouter]:
    """An app process serving the tenants (hears catalog changes pushed)."""
    async with listening_router(settings(migrated, migrated_two)) as router:
        yield router


@pytest.fixture
async def operator(migrated: DevCluster, migrated_two: DevCluster) -> AsyncIterator[SessionRouter]:
    """The operator's process running the move."""
    router = SessionRouter(settings(migrated, migrated_two))
    try:
        yield router
    finally:
        await router.dispose()


def new_tenant(strategy: str) -> tuple[str, TenantSettings]:
    tag = uuid.uuid4().hex[:8]
    if strategy == "database":
        return f"mv-db-{tag}", TenantSettings(strategy="database", database=f"mv_{tag}")
    return f"mv-sc-{tag}", TenantSettings(strategy="schema")


async def seeded(router: SessionRouter, strategy: str) -> str:
    tenant_id, tenant = new_tenant(strategy)
    await provisioning.add_tenant(router, tenant_id, tenant, metadata=Base.metadata)
    async with router.session(tenant=tenant_id) as session:
        await session.execute(
            text("INSERT INTO items (name) SELECT 'seed-' || g FROM generate_series(1, :n) g"),
            {"n": SEED_ROWS},
        )
    return tenant_id


async def checksum(router: SessionRouter, tenant_id: str, where: str = "") -> tuple[int, int]:
    async with router.session(tenant=tenant_id) as session:  # the primary: no replica lag
        row = (await session.execute(text(CHECKSUM + where))).one()
    return int(row[0]), int(row[1])


@dataclass
class Load:
    """What a tenant's clients saw while it moved."""

    acknowledged: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)  # 503 + Retry-After: nothing written
    write_errors: list[str] = field(default_factory=list)
    read_errors: list[str] = field(default_factory=list)
    reads: int = 0


async def writer(
    router: SessionRouter, tenant: str, me: int, load: Load, stop: asyncio.Event
) -> None:
    sequence = 0
    while not stop.is_set():
        name, sequence = f"w{me}-{sequence}", sequence + 1
        try:
            async with router.session(tenant=tenant) as session:
                await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
            load.acknowledged.add(name)
        except DatabaseUnavailableError:
            load.refused.add(name)
        except Exception as exc:
            load.write_errors.append(repr(exc))
        await asyncio.sleep(0.002)


async def reader(router: SessionRouter, tenant: str, load: Load, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with router.session(tenant=tenant, read_only=True) as session:
                await session.scalar(text("SELECT count(*) FROM items"))
            load.reads += 1
        except Exception as exc:
            load.read_errors.append(repr(exc))
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("strategy", ["schema", "database"])
async def test_a_tenant_moves_under_load_without_losing_or_duplicating_a_row(
    serving: SessionRouter,
    operator: SessionRouter,
    migrated: DevCluster,
    migrated_two: DevCluster,
    strategy: str,
) -> None:
    tenant = await seeded(operator, strategy)
    before = await checksum(serving, tenant)
    assert before[0] == SEED_ROWS
    # A process that never hears of the move (not started: no listener; no TTL re-read).
    unaware = SessionRouter(settings(migrated, migrated_two, tenancy={"catalog_ttl": 3600.0}))
    await unaware.tenants.resolve(tenant)
    load, stop = Load(), asyncio.Event()
    clients = [
        *(asyncio.create_task(writer(serving, tenant, me, load, stop)) for me in range(3)),
        *(asyncio.create_task(reader(serving, tenant, load, stop)) for _ in range(2)),
    ]
    try:
        await eventually(lambda: len(load.acknowledged) > 30, within=10, what="writes on A")
        report = await moves.move_tenant(
            operator, tenant, "second", migrator=create_all_migrator(Base.metadata)
        )
        after_switch = len(load.acknowledged)
        await eventually(
            lambda: len(load.acknowledged) > after_switch + 30, within=10, what="writes on B"
        )
    finally:
        stop.set()
        await asyncio.gather(*clients)

    assert load.read_errors == [] and load.write_errors == []
    assert load.reads > 0
    # Served from the second cluster now, by a process that only heard of the move.
    async with serving.session(tenant=tenant) as session:
        rows = set(await session.scalars(text("SELECT name FROM items")))
        ids = list(await session.scalars(text("SELECT id FROM items")))
    assert session.info["node"].startswith("second")
    seeds = {f"seed-{n}" for n in range(1, SEED_ROWS + 1)}
    assert load.acknowledged <= rows  # nothing acknowledged was lost
    assert rows <= load.acknowledged | seeds  # nothing appeared that nobody wrote
    assert not rows & load.refused  # a refused write wrote nothing
    assert len(ids) == len(set(ids)) == len(rows)  # no row twice, sequences advanced
    assert await checksum(serving, tenant, " WHERE name LIKE 'seed-%'") == before
    assert 0 < report.write_pause_ms < 5000
    assert SEED_ROWS <= report.rows <= len(rows)  # counted on the target after the switch
    assert report.source == ("main" if strategy == "schema" else f"main@{tenant_db(tenant)}")

    # The old storage refuses writes, kept until dropped: a process that never heard of the
    # move gets 503 (nothing written), and so does anyone writing there by hand.
    try:
        with pytest.raises(TenantMovingError):
            async with unaware.session(tenant=tenant) as session:
                await session.execute(text("INSERT INTO items (name) VALUES ('stale')"))
    finally:
        await unaware.dispose()
    with pytest.raises(asyncpg.PostgresError) as refused:
        await write_directly_to_old_storage(migrated, tenant, strategy)
    assert refused.value.sqlstate == "55R01"
    removed = await moves.drop_moved(operator, tenant)
    assert removed.schema or removed.database
    await provisioning.remove_tenant(operator, tenant, drop=True)


async def moving_to_second(operator: SessionRouter, tenant: str) -> asyncio.Task[Any]:
    """A move of `tenant` to the second cluster, running, once it has started copying."""
    copying = asyncio.Event()
    move = asyncio.create_task(
        moves.move_tenant(
            operator,
            tenant,
            "second",
            migrator=create_all_migrator(Base.metadata),
            on_progress=lambda progress: copying.set(),
        )
    )
    await asyncio.wait_for(copying.wait(), timeout=30)
    return move


def tenant_db(tenant: str) -> str:
    return "mv_" + tenant.rsplit("-", 1)[1]


async def write_directly_to_old_storage(main: DevCluster, tenant: str, strategy: str) -> None:
    database = tenant_db(tenant) if strategy == "database" else "app"
    table = "items" if strategy == "database" else f'"{tenant.replace("-", "_")}".items'
    conn = await asyncpg.connect(
        host="127.0.0.1", port=main.primary.port, user=APP_ROLE, database=database
    )
    try:
        await conn.execute(f"INSERT INTO {table} (name) VALUES ('stale')")
    finally:
        await conn.close()


async def test_an_aborted_move_leaves_the_tenant_working_where_it_was(
    serving: SessionRouter,
    operator: SessionRouter,
    migrated: DevCluster,
    migrated_two: DevCluster,
) -> None:
    tenant = await seeded(operator, "schema")
    before = await checksum(serving, tenant)
    move = await moving_to_second(operator, tenant)
    # A second move of the same tenant while this one runs is refused.
    with pytest.raises(TenantConflictError, match="being moved"):
        await moves.move_tenant(
            serving, tenant, "second", migrator=create_all_migrator(Base.metadata)
        )
    with pytest.raises(TenantConflictError, match="move record"):
        await provisioning.remove_tenant(serving, tenant, drop=True)
    move.cancel()  # the operator's Ctrl-C, halfway
    with pytest.raises(asyncio.CancelledError):
        await move
    await moves.abort_move(operator, tenant)

    async with serving.session(tenant=tenant) as session:
        await session.execute(text("INSERT INTO items (name) VALUES ('after-abort')"))
    assert session.info["node"].startswith("main")
    assert await checksum(serving, tenant, " WHERE name LIKE 'seed-%'") == before
    name = logical_copy.copy_name(tenant)
    assert (
        migrated.sql(
            "primary",
            f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{name}'",
            database="app",
        )
        == "0"
    )
    assert (
        migrated.sql(
            "primary",
            f"SELECT count(*) FROM pg_publication WHERE pubname = '{name}'",
            database="app",
        )
        == "0"
    )
    assert (
        migrated_two.sql(
            "primary",
            f"SELECT count(*) FROM pg_subscription WHERE subname = '{name}'",
            database="app",
        )
        == "0"
    )
    schema = tenant.replace("-", "_")
    assert (
        migrated_two.sql(
            "primary",
            f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'",
            database="app",
        )
        == "0"
    )
    assert await moves.moves_under_way(operator) == {} or tenant not in await moves.moves_under_way(
        operator
    )
    await provisioning.remove_tenant(operator, tenant, drop=True)


async def test_a_table_that_cannot_move_online_is_refused_before_anything_changes(
    operator: SessionRouter, migrated_two: DevCluster
) -> None:
    tenant = await seeded(operator, "schema")
    schema = tenant.replace("-", "_")
    async with operator.session(tenant=tenant) as session:
        await session.execute(text("CREATE TABLE audit (note text)"))  # no primary key
    with pytest.raises(MoveError, match="without a primary key cannot be moved online: audit"):
        await moves.move_tenant(
            operator, tenant, "second", migrator=create_all_migrator(Base.metadata)
        )
    assert tenant not in await moves.moves_under_way(operator)
    exists = f"SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'"
    assert migrated_two.sql("primary", exists, database="app") == "0"
    await provisioning.remove_tenant(operator, tenant, drop=True)


def test_the_command_line_moves_a_tenant_and_reports_it(
    migrated: DevCluster, migrated_two: DevCluster, tmp_path: Path
) -> None:
    """`tenants add` (Alembic), `tenants move` with its report, `check` showing the tenant
    in motion, `drop-moved`, `remove`: as an operator runs them."""
    config = tmp_path / "two.toml"
    config.write_text(toml_of({"database": two_cluster_config(migrated, migrated_two)}))
    tenant = f"cli-mv-{uuid.uuid4().hex[:6]}"

    def run(*args: str) -> str:
        done = run_app(config, *args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("tenants", "add", tenant, "--strategy", "schema")
    report = run("tenants", "move", tenant, "--to", "second")
    assert f"tenant {tenant} moved" in report and "write pause" in report
    assert f"tenants drop-moved {tenant}" in report
    checked = run("check")
    assert "tenants in motion" in checked and tenant in checked and "moved" in checked
    refused = run_app(config, "tenants", "move", tenant, "--abort")
    assert refused.returncode == 1 and "already switched" in refused.stderr
    assert "dropped schema" in run("tenants", "drop-moved", tenant)
    assert "tenants in motion" not in run("check")
    run("tenants", "remove", tenant, "--drop")


async def test_a_switch_blocked_by_a_long_transaction_gives_up_and_the_move_resumes(
    migrated: DevCluster, migrated_two: DevCluster, serving: SessionRouter
) -> None:
    """A transaction holding the tenant's table past the write pause: the fence gives up
    within the pause, writes go on at the source, nothing moved; run again, the move ends."""
    operator = SessionRouter(settings(migrated, migrated_two, tenancy={"move_write_pause": 0.5}))
    tenant = await seeded(operator, "schema")
    schema = tenant.replace("-", "_")
    holder = await asyncpg.connect(
        host="127.0.0.1", port=migrated.primary.port, user=APP_ROLE, database="app"
    )
    try:
        # Once copying, the lock a writer holds, without writing: a transaction that has
        # written holds up logical decoding itself (the slot's creation, the catch-up), and
        # the move waits for it, showing bytes behind.
        move = await moving_to_second(operator, tenant)
        blocker = holder.transaction()
        await blocker.start()
        await holder.execute(f'LOCK TABLE "{schema}".items IN ROW EXCLUSIVE MODE')
        with pytest.raises(MoveError, match="write pause"):
            await asyncio.wait_for(move, timeout=30)
        await blocker.rollback()
        # Writable on the source again, the move recorded as copying (resumable).
        async with serving.session(tenant=tenant) as session:
            await session.execute(text("INSERT INTO items (name) VALUES ('after-give-up')"))
        assert session.info["node"].startswith("main")
        assert (await moves.moves_under_way(operator))[tenant]["state"] == "copying"
        report = await moves.move_tenant(
            operator, tenant, "second", migrator=create_all_migrator(Base.metadata)
        )
        assert report.rows == SEED_ROWS + 1
        await moves.drop_moved(operator, tenant)
        await provisioning.remove_tenant(operator, tenant, drop=True)
    finally:
        await holder.close()
        await operator.dispose()
