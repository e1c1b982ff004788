"""Online tenant moves: a database or schema tenant from one configured cluster to another.

`move_tenant` runs in one process (the operator's `python -m app tenants move`) while the
app's processes serve the tenant throughout. Its state lives in the catalog
(`router_tenant_moves`), so every step can be resumed by running the move again:

1. **copying**: the target storage is created and brought to the app's head (the migrator the
   caller passes, e.g. Alembic); the source's tables are published and the target subscribes,
   copying them and then streaming every change (`db/logical_copy.py`). Reads and writes go
   to the source as before.
2. **paused**: once the target has copied everything and is close behind, the catalog says
   so (pushed to every process): new writes of the tenant wait (`tenancy.move_write_pause`,
   then 503 + Retry-After), reads go on. The source is fenced (a write that reaches it from a
   process that has not heard yet fails with nothing written, 503), its final WAL position
   read, the target waited for until it has applied it, row counts compared table by table,
   sequences advanced, and the target's replicas waited for.
3. **moved**: one catalog transaction points the tenant at the target and records the move;
   held writes go to the target. The publication and subscription are dropped. The old
   storage stays, fenced, until `drop_moved` (never dropped silently).

`abort_move` (before the switch) drops what the move created and unfences the source: the
tenant stays where it was, untouched. A second move of the same tenant while one runs is
refused (a session advisory lock held by the running move).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from pg_session_router.core.errors import ConfigError, MoveError, TenantConflictError
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import logical_copy as copy
from pg_session_router.db.catalog import tenant_moves_table, tenants_table
from pg_session_router.db.catalog_listener import notify_statement
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.migrate import TargetMigrator, target_of
from pg_session_router.db.provisioning import (
    catalog_tenant,
    reserve_move_target,
    wait_for_replicas,
)
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.tasks import connect_direct
from pg_session_router.db.tenancy import Placement, place
from pg_session_router.db.tenant_storage import DataRemoved, create_storage, drop_storage

#: The target may be this far behind (bytes of WAL) when writes are paused: what is left is
#: applied during the pause, so this bounds it.
CATCH_UP_BYTES = 64 * 1024
#: Seconds the target may take to apply the last changes once writes are paused.
FINAL_APPLY_TIMEOUT = 30.0
_POLL = 0.2


@dataclass(frozen=True, slots=True)
class MoveProgress:
    phase: str  # "copying", "catching up", "switching", "cleaning up"
    copy: copy.CopyProgress | None = None


@dataclass(frozen=True, slots=True)
class MoveReport:
    tenant_id: str
    source: str
    target: str
    rows: int
    bytes: int
    write_pause_ms: int
    seconds: float


@dataclass(frozen=True, slots=True)
class _Move:
    """Both sides of one move, as placements and as storage reached with admin URLs."""

    tenant_id: str
    source_placement: Placement
    target_placement: Placement
    source: copy.Storage
    target: copy.Storage

    @property
    def name(self) -> str:
        return copy.copy_name(self.tenant_id)


Progress = Callable[[MoveProgress], None]


async def move_tenant(
    router: SessionRouter,
    tenant_id: str,
    to: str,
    *,
    migrator: TargetMigrator,
    on_progress: Progress | None = None,
    copy_timeout: float | None = None,
) -> MoveReport:
    """Move a catalogued tenant to cluster `to` (or resume its move there); see the module
    docstring. Raises `MoveError` when a step cannot go on (the tenant stays on the source,
    writable), `TenantConflictError` for a move that may not start."""
    started = time.monotonic()
    notify: Progress = on_progress or (lambda _: None)
    async with _move_lock(router, tenant_id):
        tenant = await catalog_tenant(router, tenant_id)
        record = await _record(router, tenant_id)
        if record is None:
            move = _plan(
                router, tenant_id, tenant, tenant.cluster or router.tenants.default_cluster, to
            )
            await _start(router, move)
        else:
            if record["target_cluster"] != to:
                raise TenantConflictError(
                    f"tenant {tenant_id!r} is being moved to {record['target_cluster']!r}: "
                    "resume that move, or abort it first (--abort)"
                )
            source_settings = tenant.model_copy(update={"cluster": record["source_cluster"]})
            move = _plan(router, tenant_id, source_settings, record["source_cluster"], to)
        if record is None or record["state"] != "moved":
            await _prepare_target(router, move, migrator, adopt=record is not None)
            await _copy(router, move, notify, copy_timeout)
            pause_ms = await _switch(router, move, notify)
        else:
            pause_ms = int(record["write_pause_ms"] or 0)
        notify(MoveProgress("cleaning up"))
        await _drop_replication(router, move)
        rows, size = await _measure(router, move)
        await _finish(router, tenant_id, rows, size)
    return MoveReport(
        tenant_id,
        move.source_placement.cluster_key.name,
        move.target_placement.cluster_key.name,
        rows,
        size,
        pause_ms,
        time.monotonic() - started,
    )


async def abort_move(router: SessionRouter, tenant_id: str) -> None:
    """Undo a move that has not switched: the tenant stays on the source, writable."""
    async with _move_lock(router, tenant_id):
        tenant = await catalog_tenant(router, tenant_id)
        record = await _record(router, tenant_id)
        if record is None:
            raise MoveError(f"tenant {tenant_id!r} is not being moved")
        if record["state"] == "moved":
            raise MoveError(
                f"tenant {tenant_id!r} has already switched to {record['target_cluster']!r}; "
                "to go back, drop the old storage (drop-moved) and move it again"
            )
        move = _plan(router, tenant_id, tenant, record["source_cluster"], record["target_cluster"])
        target_exists = await _storage_exists(router, move.target, move.target_placement)
        if target_exists:
            await _drop_replication(router, move)
        else:  # the move stopped before creating it: nothing subscribes
            async with _connected(router, move.source) as source:
                await copy.drop_publication(source, move.name)
        async with _connected(router, move.source) as conn:
            await copy.unfence(conn, move.source)
        if target_exists:
            await router.close_tenant_cluster(move.target_placement.cluster_key)
            await drop_storage(router, move.target_placement, None)
        await _catalog_change(
            router,
            tenant_id,
            delete(tenant_moves_table).where(tenant_moves_table.c.tenant_id == tenant_id),
        )
        router.tenants.remember(tenant_id, tenant)


async def drop_moved(router: SessionRouter, tenant_id: str) -> DataRemoved:
    """Delete the storage a moved tenant left behind (fenced since the switch)."""
    async with _move_lock(router, tenant_id):
        tenant = await catalog_tenant(router, tenant_id)
        record = await _record(router, tenant_id)
        if record is None or record["state"] != "moved":
            raise MoveError(f"tenant {tenant_id!r} has no moved-away storage to drop")
        old = tenant.model_copy(update={"cluster": record["source_cluster"]})
        old_placement = place(tenant_id, old, router.tenants.default_cluster)
        if old_placement.cluster_key == router.tenants.placement(tenant_id).cluster_key:
            raise MoveError(f"tenant {tenant_id!r} lives on {record['source_cluster']!r}")
        source_settings = tenant.model_copy(update={"cluster": record["source_cluster"]})
        move = _plan(
            router, tenant_id, source_settings, record["source_cluster"], record["target_cluster"]
        )
        await _drop_replication(router, move)  # a cleanup that failed after the switch
        await router.close_tenant_cluster(old_placement.cluster_key)
        removed = await drop_storage(router, old_placement, None)
        await _catalog_change(
            router,
            tenant_id,
            delete(tenant_moves_table).where(tenant_moves_table.c.tenant_id == tenant_id),
        )
        router.tenants.remember(tenant_id, tenant)
        return removed


async def moves_under_way(router: SessionRouter) -> dict[str, dict[str, Any]]:
    """Every move in the catalog (for `check` and operators): tenant id -> its record."""
    async with router.session(read_only=True) as session:
        if await session.scalar(text("SELECT to_regclass('router_tenant_moves')")) is None:
            return {}
        rows = (await session.execute(select(tenant_moves_table))).mappings().all()
    return {row["tenant_id"]: dict(row) for row in rows}


# -- planning ------------------------------------------------------------------------------


def _plan(
    router: SessionRouter, tenant_id: str, tenant: TenantSettings, source: str, to: str
) -> _Move:
    if tenant.strategy not in ("database", "schema") or tenant.url is not None:
        raise MoveError(
            "only schema tenants and database tenants with a database on a configured "
            "cluster can move online"
        )
    if tenant.strategy == "database" and tenant.database is None:
        raise MoveError("a tenant that owns a whole cluster moves with that cluster, not alone")
    if to not in router.settings.clusters:
        raise ConfigError(f"no cluster named {to!r}")
    if to == source:
        raise MoveError(f"tenant {tenant_id!r} is on {to!r} already")
    default = router.tenants.default_cluster
    source_placement = place(tenant_id, tenant.model_copy(update={"cluster": source}), default)
    target_placement = place(tenant_id, tenant.model_copy(update={"cluster": to}), default)
    return _Move(
        tenant_id,
        source_placement,
        target_placement,
        _storage(router, source_placement),
        _storage(router, target_placement),
    )


def _storage(router: SessionRouter, placement: Placement) -> copy.Storage:
    cluster = placement.cluster_key.cluster
    assert cluster is not None
    admin = router.settings.clusters[cluster].admin
    if admin is None:
        raise ConfigError(
            f"database.clusters.{cluster}.admin: a tenant move needs a superuser connection "
            "to both clusters' primaries"
        )
    database = placement.database or router.cluster(cluster).primary.url.database
    return copy.Storage(admin.set(database=database), placement.schema or "public")


# -- steps ---------------------------------------------------------------------------------


async def _start(router: SessionRouter, move: _Move) -> None:
    """Under the management lock: refuse a target claimed by a tenant or existing already
    (it may be someone's), then record the move, which claims the target from then on."""
    values = {
        "tenant_id": move.tenant_id,
        "source_cluster": move.source_placement.cluster_key.cluster,
        "target_cluster": move.target_placement.cluster_key.cluster,
        "state": "copying",
    }

    async def record(session: AsyncSession) -> None:
        async with _connected(router, move.source) as source:
            await copy.tenant_tables(source, move.source)  # refuses what cannot move online
            others = await copy.other_schemas(source, "public")
        if move.source_placement.strategy == "database" and others:
            raise MoveError(
                "a database tenant moves its public schema only; it has tables in "
                f"{', '.join(others)}"
            )
        if await _storage_exists(router, move.target, move.target_placement):
            raise TenantConflictError(
                f"the target {_describe(move.target_placement)} exists on "
                f"{move.target_placement.cluster_key.cluster!r} already; drop it first"
            )
        await session.execute(insert(tenant_moves_table).values(**values))
        await session.execute(notify_statement(move.tenant_id))

    await reserve_move_target(router, move.tenant_id, move.target_placement.settings, record)


async def _prepare_target(
    router: SessionRouter, move: _Move, migrator: TargetMigrator, *, adopt: bool
) -> None:
    await create_storage(router, move.target_placement, adopt=adopt)
    await migrator(router, target_of(router, move.target_placement))


async def _copy(router: SessionRouter, move: _Move, notify: Progress, within: float | None) -> None:
    """Publish, subscribe, and wait until the target has copied everything and is close."""
    deadline = None if within is None else time.monotonic() + within
    async with _connected(router, move.source) as source, _connected(router, move.target) as target:
        tables = await copy.tenant_tables(source, move.source)
        subscribed = await copy.subscription_exists(target, move.name)
        if not subscribed and any((await copy.row_counts(target, move.target, tables)).values()):
            raise MoveError("the target tables hold rows already: abort and start again")
        await copy.ensure_publication(source, move.name, move.source, tables)
        await copy.ensure_subscription(target, move.name, move.source)
        previous: int | None = None
        while True:
            state = await copy.progress(source, target, move.name, move.target, tables)
            # Caught up: the target has confirmed what the source had written one poll ago
            # (on a busy shared cluster, "no bytes behind" may never be true).
            caught_up = (
                previous is not None and state.confirmed is not None and state.confirmed >= previous
            )
            notify(MoveProgress("catching up" if state.copied else "copying", state))
            if state.copied and caught_up:
                return
            previous = state.position if state.copied else None
            if deadline is not None and time.monotonic() > deadline:
                raise MoveError("the copy did not finish in time; run the move again to resume")
            await asyncio.sleep(_POLL)


async def _switch(router: SessionRouter, move: _Move, notify: Progress) -> int:
    """Pause writes, fence the source, let the target apply the rest, switch; the pause in ms."""
    notify(MoveProgress("switching"))
    tenant = move.source_placement.settings
    paused_at = time.monotonic()
    await _set_state(router, move.tenant_id, "paused", expected=("copying", "paused"))
    router.tenants.remember(move.tenant_id, tenant, "paused")
    try:
        await _fence_and_apply(router, move)
    except BaseException:
        await _resume_writes(router, move)
        raise
    pause_ms = round((time.monotonic() - paused_at) * 1000)
    target_settings = move.target_placement.settings
    async with router.session() as session:
        switched = await session.execute(
            update(tenant_moves_table)
            .where(tenant_moves_table.c.tenant_id == move.tenant_id)
            .where(tenant_moves_table.c.state == "paused")
            .values(state="moved", write_pause_ms=pause_ms)
        )
        if switched.rowcount != 1:  # type: ignore[attr-defined]
            raise MoveError("the move's record changed under it (aborted by someone?)")
        await session.execute(
            update(tenants_table)
            .where(tenants_table.c.id == move.tenant_id)
            .values(cluster=target_settings.cluster)
        )
        await session.execute(notify_statement(move.tenant_id))
    router.tenants.remember(move.tenant_id, target_settings, "moved")
    return pause_ms


async def _fence_and_apply(router: SessionRouter, move: _Move) -> None:
    pause = router.settings.tenancy.move_write_pause
    async with _connected(router, move.source) as source, _connected(router, move.target) as target:
        tables = await copy.tenant_tables(source, move.source)
        try:
            await copy.fence(source, move.source, tables, move.tenant_id, lock_timeout=pause)
        except Exception as exc:
            raise MoveError(
                "could not fence the source: a transaction held the tenant's tables longer "
                f"than the write pause ({pause:g} s); nothing changed, run the move again"
            ) from exc
        final = await copy.wal_position(source)
        if not await copy.wait_confirmed(source, move.name, final, FINAL_APPLY_TIMEOUT):
            raise MoveError("the target did not apply the last changes in time; run it again")
        before = await copy.row_counts(source, move.source, tables)
        after = await copy.row_counts(target, move.target, tables)
        if before != after:
            raise MoveError(f"row counts differ after the copy (source {before}, target {after})")
        await copy.copy_sequences(source, target, move.source)
    target_stream = ClusterKey.configured(move.target_placement.cluster_key.stream)
    if not await wait_for_replicas(router, target_stream):
        raise MoveError("the target's replicas did not replay the copy in time; run it again")


async def _resume_writes(router: SessionRouter, move: _Move) -> None:
    """A switch that failed: unfence the source and let writes go there again. If the
    fence cannot be removed, the state stays "paused" (writes answered 503), never a
    "copying" that says writable while the source refuses every write."""
    try:
        async with _connected(router, move.source) as conn:
            await copy.unfence(conn, move.source)
    except Exception as exc:
        raise MoveError(
            "the switch failed and the source could not be unfenced: the tenant's writes stay "
            "paused; run the move again, or abort it (tenants move --abort)"
        ) from exc
    await _set_state(router, move.tenant_id, "copying", expected=("paused",))
    router.tenants.remember(move.tenant_id, move.source_placement.settings, "copying")


async def _drop_replication(router: SessionRouter, move: _Move) -> None:
    async with _connected(router, move.target) as target:
        await copy.drop_subscription(target, move.name)
    async with _connected(router, move.source) as source:
        await copy.drop_publication(source, move.name)


async def _measure(router: SessionRouter, move: _Move) -> tuple[int, int]:
    async with _connected(router, move.target) as target:
        tables = await copy.tenant_tables(target, move.target)
        rows = sum((await copy.row_counts(target, move.target, tables)).values())
        return rows, await copy.table_bytes(target, move.target, tables)


async def _finish(router: SessionRouter, tenant_id: str, rows: int, size: int) -> None:
    async with router.session() as session:
        await session.execute(
            update(tenant_moves_table)
            .where(tenant_moves_table.c.tenant_id == tenant_id)
            .values(rows_copied=rows, bytes_copied=size)
        )


# -- catalog and connections ---------------------------------------------------------------


async def _record(router: SessionRouter, tenant_id: str) -> dict[str, Any] | None:
    async with router.session() as session:
        query = select(tenant_moves_table).where(tenant_moves_table.c.tenant_id == tenant_id)
        row = (await session.execute(query)).mappings().first()
    return None if row is None else dict(row)


async def _set_state(
    router: SessionRouter, tenant_id: str, state: str, *, expected: tuple[str, ...]
) -> None:
    async with router.session() as session:
        changed = await session.execute(
            update(tenant_moves_table)
            .where(tenant_moves_table.c.tenant_id == tenant_id)
            .where(tenant_moves_table.c.state.in_(expected))
            .values(state=state)
        )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            raise MoveError("the move's record changed under it (aborted by someone?)")
        await session.execute(notify_statement(tenant_id))


async def _catalog_change(router: SessionRouter, tenant_id: str, statement: Any) -> None:
    """One catalog statement and its notification, in one transaction."""
    async with router.session() as session:
        await session.execute(statement)
        await session.execute(notify_statement(tenant_id))


@contextlib.asynccontextmanager
async def _move_lock(router: SessionRouter, tenant_id: str) -> AsyncIterator[None]:
    """Held for the whole move on a direct connection of its own (not a pooled one, which
    would keep it after an unlock that failed): a second move, abort or drop of the same
    tenant is refused while it runs, and a crashed move's lock goes with its connection."""
    digest = hashlib.sha256(f"pgrouter-move:{tenant_id}".encode()).digest()
    key = int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
    node = router.default_cluster.primary  # the writer if there is one
    conn = await connect_direct(
        node.direct_url,  # the server itself: a session lock cannot go through a pooler
        connect_timeout=router.settings.connect_timeout,
        application_name=copy.APPLICATION_NAME,
        password=node.password,
    )
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            raise TenantConflictError(
                f"tenant {tenant_id!r} is being moved by another process right now"
            )
        yield
    finally:
        await conn.close()  # releases the lock


@contextlib.asynccontextmanager
async def _connected(
    router: SessionRouter, storage: copy.Storage, *, database_of_cluster: bool = False
) -> AsyncIterator[Any]:
    """An admin connection to one side; `database_of_cluster`: to the cluster's own database
    (the tenant's database may not exist yet)."""
    if database_of_cluster:
        storage = copy.Storage(storage.admin_url.set(database="postgres"), storage.schema)
    conn = await copy.connect(storage, connect_timeout=router.settings.connect_timeout)
    try:
        yield conn
    finally:
        await conn.close()


async def _storage_exists(
    router: SessionRouter, storage: copy.Storage, placement: Placement
) -> bool:
    if placement.strategy == "database":
        async with _connected(router, storage, database_of_cluster=True) as conn:
            query = "SELECT 1 FROM pg_database WHERE datname = $1"
            return bool(await conn.fetchval(query, placement.database))
    async with _connected(router, storage) as conn:
        query = "SELECT 1 FROM pg_namespace WHERE nspname = $1"
        return bool(await conn.fetchval(query, placement.schema))


def _describe(placement: Placement) -> str:
    if placement.strategy == "database":
        return f"database {placement.database!r}"
    return f"schema {placement.schema!r}"
