"""Running an `Action` on migration targets, one transaction per target.

Each target runs in its own transaction on its primary, under its advisory lock
(`target_connection`): Alembic's DDL is transactional in PostgreSQL, so a target that fails
is left exactly as it was, and a re-run resumes (targets at the revision asked for change
nothing). One failing target never stops the others: its outcome says why.

Concurrency uses processes (`workers.py`), never tasks: Alembic's `op` and `context` are
module-level proxies to the migration running now, so two migrations interleaved on one
event loop would send each other's DDL to the wrong tenant.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from pg_session_router.core.errors import ConfigError, MigrationError
from pg_session_router.core.names import quote_identifier
from pg_session_router.core.settings import RouterSettings
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.migrate import (
    ROW_TENANT_CONDITION,
    MigrationTarget,
    TargetMigrator,
    default_target,
    enable_row_security,
    migration_targets,
    prepare_target,
    target_connection,
)
from pg_session_router.db.router import SessionRouter
from pg_session_router.migrations.plan import Action, AlembicMigrations, TargetOutcome

logger = logging.getLogger(__name__)

OnOutcome = Callable[[TargetOutcome], None]


async def migrate_targets(
    settings: RouterSettings,
    migrations: AlembicMigrations,
    action: Action,
    *,
    tenant_ids: Sequence[str] | None = None,
    cluster: str | None = None,
    concurrency: int = 1,
    on_planned: Callable[[int], None] | None = None,
    on_outcome: OnOutcome | None = None,
) -> list[TargetOutcome]:
    """Every selected target (all of them by default), in order: the default cluster first
    (it holds the tenant catalog, read after it is migrated), then the tenants, `concurrency`
    at a time in worker processes. Returns one outcome per target."""
    check_revision(migrations, action)
    report = on_outcome or (lambda outcome: None)
    router = SessionRouter.from_settings(settings)
    try:
        outcomes = await _migrate_default_first(router, migrations, action, tenant_ids, cluster)
        targets = await _tenant_targets(router, tenant_ids, cluster, outcomes)
        if on_planned is not None:
            on_planned(len(outcomes) + len(targets))
        for outcome in outcomes:
            report(outcome)
        if concurrency > 1 and len(targets) > 1:
            from pg_session_router.migrations.workers import run_in_workers

            workers = min(concurrency, len(targets), _worker_budget(settings))
            outcomes += await run_in_workers(settings, migrations, action, targets, workers, report)
            return outcomes
        for target in targets:
            outcomes.append(await run_target(router, target, migrations, action))
            report(outcomes[-1])
        return outcomes
    finally:
        await router.dispose()


async def _migrate_default_first(
    router: SessionRouter,
    migrations: AlembicMigrations,
    action: Action,
    tenant_ids: Sequence[str] | None,
    cluster: str | None,
) -> list[TargetOutcome]:
    """The default cluster's target, before the catalog on it is read (a fresh deployment's
    catalog table is created there). Reads and dry runs list it with the others."""
    if tenant_ids is not None or not action.writes:
        return []
    if cluster is not None and router.default_cluster.key.name != cluster:
        return []
    return [await run_target(router, default_target(router), migrations, action)]


async def _tenant_targets(
    router: SessionRouter,
    tenant_ids: Sequence[str] | None,
    cluster: str | None,
    done: list[TargetOutcome],
) -> list[MigrationTarget]:
    if cluster is not None and cluster not in router.settings.clusters:
        raise ConfigError(f"--cluster: no cluster named {cluster!r} in database.clusters")
    if router.tenants.catalog is not None:
        await router.tenants.reload()
        if router.tenants.catalog_unreachable:
            # Migrating "every tenant" without the catalog would silently skip most of them.
            why = f"{done[0].target.label}: {done[0].error}; " if done and done[0].failed else ""
            raise MigrationError(
                f"{why}the tenant catalog on the default cluster is unreachable: no tenant "
                "was migrated"
            )
    targets = migration_targets(router, tenant_ids=tenant_ids, cluster=cluster)
    finished = {outcome.target for outcome in done}
    return [target for target in targets if target not in finished]


def _worker_budget(settings: RouterSettings) -> int:
    """Worker processes within `database.max_connections`: each holds at most two
    connections at a time (its target's, and the one it read the catalog on)."""
    limit = settings.database.max_connections
    return max(1, limit // 2) if limit else 1_000_000


def check_revision(migrations: AlembicMigrations, action: Action) -> str | None:
    """The history's head; a revision that does not exist (or several heads, a history to
    merge first) is a usage error, found before any target is touched."""
    script = ScriptDirectory.from_config(migrations.alembic_config())
    try:
        head = script.get_current_head()
        if action.kind != "current" and action.revision[:1] not in "+-":
            script.get_revisions(action.revision)  # relative ones resolve per target
    except Exception as exc:
        raise ConfigError(f"revisions: {exc}") from None
    return head


async def run_target(
    router: SessionRouter, target: MigrationTarget, migrations: AlembicMigrations, action: Action
) -> TargetOutcome:
    """One target; never raises for a failure of the target itself (the outcome says it)."""
    started = time.perf_counter()
    try:
        async with (
            _alembic_turn(),
            target_connection(
                router, target, lock=action.writes, lock_timeout=action.lock_timeout
            ) as conn,
        ):
            outcome = await conn.run_sync(_run_sync, target, migrations, action)
    except Exception as exc:
        logger.debug("migrating %s failed", target.label, exc_info=True)
        return TargetOutcome(
            target, "failed", seconds=time.perf_counter() - started, error=describe_error(exc)
        )
    return replace(outcome, seconds=time.perf_counter() - started)


def _run_sync(
    conn: Connection, target: MigrationTarget, migrations: AlembicMigrations, action: Action
) -> TargetOutcome:
    tables = _tables_here(conn, migrations)
    before = _revision(conn) if _VERSION_TABLE in tables else None
    stamp = before is None and action.kind == "upgrade" and _holds_baseline(tables, migrations)
    if action.kind == "current":
        return TargetOutcome(target, "current", before, before)
    if action.sql:
        return _plan(conn, target, migrations, action, before, stamp=stamp)
    config = migrations.alembic_config(connection=conn, schema=target.schema)
    prepare_target(conn, target)
    if stamp:
        _stamp(conn, config, migrations)
    if action.kind == "upgrade":
        command.upgrade(config, action.revision)
    else:
        command.downgrade(config, action.revision)
    after = _revision(conn)
    if stamp:
        return TargetOutcome(target, "stamped", before, after)
    if after == before:
        return TargetOutcome(target, "unchanged", before, after)
    return TargetOutcome(
        target, "upgraded" if action.kind == "upgrade" else "downgraded", before, after
    )


def _plan(
    conn: Connection,
    target: MigrationTarget,
    migrations: AlembicMigrations,
    action: Action,
    before: str | None,
    *,
    stamp: bool,
) -> TargetOutcome:
    """Offline mode: Alembic writes the SQL instead of running it."""
    start = migrations.baseline.revision if stamp and migrations.baseline else before
    config = migrations.alembic_config(schema=target.schema)
    if start is None and action.kind == "upgrade":
        command.upgrade(config, action.revision, sql=True)
    elif start is None:
        return TargetOutcome(target, "planned", before, before, sql="")
    else:
        run = command.upgrade if action.kind == "upgrade" else command.downgrade
        run(config, f"{start}:{action.revision}", sql=True)
    buffer = config.output_buffer
    sql = buffer.getvalue() if buffer is not None else ""  # type: ignore[attr-defined]
    if stamp:
        sql = f"-- unversioned, holds the baseline tables: stamped at {start} first\n{sql}"
    if target.creates_schema and target.schema is not None and before is None:
        sql = f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(target.schema)};\n\n{sql}"
    return TargetOutcome(target, "planned", before, None, sql=sql)


def _stamp(conn: Connection, config: Config, migrations: AlembicMigrations) -> None:
    """The baseline's tables are there: record its revision, and make sure of what its
    revision made beyond tables and columns, the row-level security of tenant tables (an old
    or hand-made table without it would otherwise be taken as confined)."""
    assert migrations.baseline is not None
    command.stamp(config, migrations.baseline.revision)
    for table, columns in migrations.baseline.tables.items():
        if "tenant_id" in columns:
            enable_row_security(conn, table, None, ROW_TENANT_CONDITION)


_VERSION_TABLE = "alembic_version"
# One round trip for what a target holds: its version table, and the baseline's tables with
# their columns. pg_catalog, not information_schema, whose views cost a tenth of a second per
# target once there are thousands of tenant schemas. The target's schema is the search path's.
_TABLES_HERE = text(
    "SELECT c.relname, a.attname FROM pg_class c"
    " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
    " WHERE c.relnamespace = current_schema()::regnamespace AND c.relname = ANY(:names)"
    " AND c.relkind IN ('r', 'p')"
)


def _tables_here(conn: Connection, migrations: AlembicMigrations) -> dict[str, set[str]]:
    """Of the version table and the baseline's tables, those in the target: name -> columns."""
    names = [_VERSION_TABLE, *(migrations.baseline.tables if migrations.baseline else ())]
    found: dict[str, set[str]] = {}
    for table, column in conn.execute(_TABLES_HERE, {"names": names}):
        found.setdefault(table, set()).add(column)
    return found


def _revision(conn: Connection) -> str | None:
    """The target's revision(s); it has a version table (Alembic keeps it at base too)."""
    heads = conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars().all()
    return ",".join(sorted(heads)) if heads else None


def _holds_baseline(tables: dict[str, set[str]], migrations: AlembicMigrations) -> bool:
    """The target has the baseline's tables and columns, exactly (an unversioned target)."""
    baseline = migrations.baseline
    found = {name: columns for name, columns in tables.items() if name != _VERSION_TABLE}
    if baseline is None or not found:
        return False
    if found != {name: set(columns) for name, columns in baseline.tables.items()}:
        names = ", ".join(sorted(found))
        raise MigrationError(
            f"holds {names} but no version table, and not as revision {baseline.revision} "
            "made them: not stamped (compare by hand, then `alembic stamp` or repair)"
        )
    return True


def alembic_migrator(migrations: AlembicMigrations, action: Action | None = None) -> TargetMigrator:
    """For `provisioning.add_tenant`: a new tenant's storage upgraded with the same code."""
    chosen = action or Action()

    async def migrate_with_alembic(router: SessionRouter, target: MigrationTarget) -> None:
        outcome = await run_target(router, target, migrations, chosen)
        if outcome.failed:
            raise MigrationError(f"migrating {target.label} failed: {outcome.error}")

    return migrate_with_alembic


def failed_labels(outcomes: Iterable[TargetOutcome]) -> list[str]:
    return [f"{outcome.target.label} ({outcome.error})" for outcome in outcomes if outcome.failed]


@asynccontextmanager
async def _alembic_turn() -> AsyncIterator[None]:
    """One Alembic run at a time per event loop. Alembic's `op` and `context` are
    module-level proxies to the migration running now, and every statement of a migration
    yields to the loop: two migrations interleaved (two `add_tenant` calls at once, say)
    would run one tenant's DDL on the other's connection. Processes, not tasks, give
    `migrate --concurrency` its parallelism. Alembic must not run in two threads at once
    either; nothing here can guard that."""
    loop = asyncio.get_running_loop()
    lock = _TURNS.get(loop)
    if lock is None:
        lock = _TURNS[loop] = asyncio.Lock()
    async with lock:
        yield


# The one piece of module state: it guards Alembic's own, which is process-wide.
_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
