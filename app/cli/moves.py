"""`python -m app tenants move ID --to CLUSTER [--abort]` and `tenants drop-moved ID`.

The move runs here, in the operator's process, while the app's processes keep serving the
tenant (`pg_session_router.db.moves`). Progress (tables copied, rows, bytes behind) on stderr;
a report at the end. Interrupted (Ctrl-C) or failed, it is resumed by running it again, or
undone with `--abort`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator

from rich.table import Table

from app.cli.common import console, progress_bar
from app.db.migrate import app_migrations
from pg_session_router.core.errors import ConfigError
from pg_session_router.db import moves
from pg_session_router.db.router import SessionRouter
from pg_session_router.migrations import alembic_migrator


def add_move_commands(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    move = actions.add_parser(
        "move", help="move a tenant to another cluster online (resumable; --abort undoes)"
    )
    move.add_argument("tenant_id")
    move.add_argument("--to", metavar="CLUSTER", help="the target cluster (not with --abort)")
    move.add_argument(
        "--abort",
        action="store_true",
        help="undo a move that has not switched yet: the tenant stays where it is, untouched",
    )
    move.add_argument(
        "--timeout", type=float, default=None, help="seconds the copy may take (default: none)"
    )
    dropped = actions.add_parser(
        "drop-moved", help="delete the storage a moved tenant left on its old cluster"
    )
    dropped.add_argument("tenant_id")


async def run_move(router: SessionRouter, args: argparse.Namespace) -> None:
    if args.abort:
        await moves.abort_move(router, args.tenant_id)
        print(f"move of tenant {args.tenant_id} aborted: it stays where it was")
        return
    if args.to is None:
        raise ConfigError("tenants move: --to CLUSTER is required (or --abort)")
    with progress_bar() as bar, _cancelled_by_signals():
        task = bar.add_task("copying", total=None)

        def show(progress: moves.MoveProgress) -> None:
            state = progress.copy
            detail = ""
            if state is not None:
                behind = state.lag_bytes()
                lag = "-" if behind is None else f"{behind:,} B behind"
                detail = f": {state.tables_ready}/{state.tables} tables, {state.rows:,} rows, {lag}"
                bar.update(task, completed=state.tables_ready, total=state.tables)
            bar.update(task, description=progress.phase + detail)

        report = await moves.move_tenant(
            router,
            args.tenant_id,
            args.to,
            migrator=alembic_migrator(app_migrations()),
            on_progress=show,
            copy_timeout=args.timeout,
        )
    table = Table(title=f"tenant {report.tenant_id} moved")
    for column in ("from", "to", "rows", "bytes", "write pause", "time"):
        table.add_column(column)
    table.add_row(
        report.source,
        report.target,
        f"{report.rows:,}",
        f"{report.bytes:,}",
        f"{report.write_pause_ms} ms",
        f"{report.seconds:.1f} s",
    )
    console().print(table)
    print(f"the old storage stays until: python -m app tenants drop-moved {report.tenant_id}")


@contextlib.contextmanager
def _cancelled_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) cancel the move like Ctrl-C, so a switch in
    progress unfences the source and releases the tenant's writes before the process ends."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    try:
        yield
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


async def run_drop_moved(router: SessionRouter, args: argparse.Namespace) -> None:
    removed = await moves.drop_moved(router, args.tenant_id)
    print(f"tenant {args.tenant_id}: {removed.describe()} on its old cluster")
