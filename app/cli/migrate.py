"""`python -m app migrate`: the app's Alembic revisions on every target.

Upgrade (the default), downgrade, read every target's revision (`current`), or write a new
revision (`revision`). A progress bar on stderr while it runs, a summary table at the end;
one failing target never stops the others, and the exit status is 1 naming them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from rich.table import Table
from rich.text import Text

from app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FULL_SUMMARY_LIMIT,
    command_parser,
    console,
    positive_int,
    progress_bar,
)
from app.core.config import load_settings
from app.db.migrate import app_migrations
from pg_session_router.migrations import Action, AlembicMigrations, TargetOutcome, migrate_targets
from pg_session_router.migrations.runner import check_revision

EXAMPLE = """python -m app migrate                          # every target to head
  python -m app migrate --tenant acme --to 0002_x   # one tenant to a revision
  python -m app migrate --concurrency 4             # tenants 4 at a time
  python -m app migrate --dry-run                   # the plan and the SQL, nothing runs
  python -m app migrate downgrade --tenant acme --to 0001_initial
  python -m app migrate current                     # a table of every target's revision
  python -m app migrate revision -m "add items.price" --autogenerate"""


def add_migrate_command(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = command_parser(
        commands, "migrate", "bring every target to a revision with Alembic", EXAMPLE
    )
    parser.add_argument(
        "action",
        nargs="?",
        default="upgrade",
        choices=["upgrade", "downgrade", "current", "revision"],
        help="upgrade (default), downgrade (needs --to), current, revision (needs -m)",
    )
    parser.add_argument("--to", metavar="REV", help="the revision to reach (default: head)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--tenant", action="append", metavar="ID", help="only this tenant (repeatable)"
    )
    chosen.add_argument(
        "--all-tenants", action="store_true", help="the default cluster and every tenant (default)"
    )
    parser.add_argument("--cluster", metavar="NAME", help="only targets on this cluster")
    parser.add_argument(
        "--concurrency", type=positive_int, default=1, metavar="N", help="tenants in parallel"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and the SQL; change nothing"
    )
    parser.add_argument(
        "--versions",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a further directory of revisions (repeatable; `revision` writes to the last)",
    )
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="a target fails if a table lock takes longer (default 10; 0: wait forever)",
    )
    parser.add_argument("-m", "--message", help="revision: its message")
    parser.add_argument("--autogenerate", action="store_true", help="revision: diff the models")


def run_migrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _check_arguments(args, parser)
    migrations = app_migrations(*args.versions)
    if args.action == "revision":
        into = args.versions[-1] if args.versions else None
        return _new_revision(migrations, args.message, autogenerate=args.autogenerate, into=into)
    action = Action(
        kind=args.action,
        revision=args.to or "head",
        sql=args.dry_run,
        lock_timeout=args.lock_timeout or None,
    )
    head = check_revision(migrations, action)  # before any target is touched
    started = time.perf_counter()
    outcomes = asyncio.run(_run(migrations, action, args))
    return _report(outcomes, action, head, time.perf_counter() - started)


def _check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.action == "downgrade" and not args.to:
        parser.error("downgrade needs --to REV (e.g. --to 0001_initial, or --to base)")
    if args.action == "revision" and not args.message:
        parser.error("revision needs -m MESSAGE")
    if args.action != "revision" and (args.message or args.autogenerate):
        parser.error("-m and --autogenerate are for `migrate revision`")
    if args.action in ("current", "revision") and (args.dry_run or args.to):
        parser.error(f"--dry-run and --to do not apply to `migrate {args.action}`")


def _new_revision(
    migrations: AlembicMigrations, message: str, *, autogenerate: bool, into: Path | None
) -> int:
    """A new revision file in the app's versions directory (or the last `--versions` one),
    diffed against the default cluster's primary with `--autogenerate`."""
    config = migrations.alembic_config()
    scripts = command.revision(
        config,
        message=message,
        autogenerate=autogenerate,
        version_path=str(into) if into else None,
    )
    for script in scripts if isinstance(scripts, list) else [scripts]:
        if script is not None:
            print(f"created revision {script.revision}: {script.path}")
    return EXIT_OK


async def _run(
    migrations: AlembicMigrations, action: Action, args: argparse.Namespace
) -> list[TargetOutcome]:
    progress = progress_bar()
    task = progress.add_task(f"migrate {action.kind}", total=None)
    with progress:
        return await migrate_targets(
            load_settings(),
            migrations,
            action,
            tenant_ids=args.tenant,
            cluster=args.cluster,
            concurrency=args.concurrency,
            on_planned=lambda total: progress.update(task, total=total),
            on_outcome=lambda outcome: progress.advance(task),
        )


def _report(
    outcomes: Sequence[TargetOutcome], action: Action, head: str | None, seconds: float
) -> int:
    out, err = console(), console(stderr=True)
    if action.sql:
        for outcome in outcomes:
            if outcome.sql:
                out.print(f"-- {outcome.target.label}", markup=False, highlight=False)
                out.print(outcome.sql, markup=False, highlight=False)
    out.print(_summary(outcomes, action, head))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.result] = counts.get(outcome.result, 0) + 1
    totals = ", ".join(f"{n} {result}" for result, n in sorted(counts.items()))
    out.print(f"{len(outcomes)} targets in {seconds:.1f} s: {totals or 'nothing to do'}")
    failed = [outcome.target.label for outcome in outcomes if outcome.failed]
    if failed:
        err.print(f"failed: {', '.join(failed)}", markup=False, highlight=False)
        return EXIT_FAILED
    return EXIT_OK


def _summary(outcomes: Sequence[TargetOutcome], action: Action, head: str | None) -> Table:
    table = Table(title=f"migrate {action.kind}" + (" (dry run)" if action.sql else ""))
    current = action.kind == "current"
    columns = ("target", "revision", "time", "state") if current else _COLUMNS
    for column in columns:
        table.add_column(column, no_wrap=column not in ("result", "state"))
    for outcome in _worth_showing(outcomes, head):
        revisions = [outcome.before or "-"]
        if not current:
            revisions.append(_after(outcome, action, head))
        time_taken = f"{outcome.seconds * 1000:.0f} ms"
        cells = [outcome.target.label, *revisions, time_taken, _result(outcome, head)]
        table.add_row(*(Text(cell) for cell in cells))  # data (errors, revisions), not markup
    return table


def _worth_showing(outcomes: Sequence[TargetOutcome], head: str | None) -> list[TargetOutcome]:
    """Every target; beyond FULL_SUMMARY_LIMIT, those that changed, failed or lag behind."""
    if len(outcomes) <= FULL_SUMMARY_LIMIT:
        return list(outcomes)
    return [
        o
        for o in outcomes
        if o.result not in ("unchanged", "current") or (o.result == "current" and o.before != head)
    ]


_COLUMNS = ("target", "from", "to", "time", "result")


def _after(outcome: TargetOutcome, action: Action, head: str | None) -> str:
    if outcome.result == "planned":
        return action.revision if action.revision != "head" else (head or "-")
    return outcome.after or "-"


def _result(outcome: TargetOutcome, head: str | None) -> str:
    if outcome.failed:
        return f"FAILED: {outcome.error}"
    if outcome.result == "current":
        if outcome.before is None:
            return "not migrated"
        return "at head" if outcome.before == head else "not at head"
    if outcome.result == "stamped":
        return "stamped (made before Alembic), upgraded"
    return outcome.result
