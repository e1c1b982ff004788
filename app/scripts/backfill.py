r"""`python -m app.scripts.backfill`: normalise item names in every tenant, in batches.

A data backfill written with the router: it strips the whitespace around each item's name and
collapses the runs inside it to one space (`btrim(regexp_replace(name, '\s+', ' ', 'g'))`),
tenant after tenant, through each tenant's primary. Every batch is its own unit of work
(`get_db_context(tenant=...)`): an UPDATE of the next `--batch-size` rows that still need it,
by keyset on `id`, whose `RETURNING id` moves the keyset on. A batch commits or not as a whole,
and locks only its own rows for the time of one short transaction.

Resumable by design: the rows chosen are only those whose name is not normalised yet, so a run
that was interrupted (Ctrl-C, a node lost, a deploy) is simply run again and continues where
it stopped; a run over data already done changes nothing.

`--tenant ID` (repeatable) picks tenants; the default is every tenant, from the configuration
and the tenant catalog, skipping (and listing as such) the disabled ones. `--dry-run` counts,
on the replicas, the rows that would change and changes nothing (a replica a little behind
may count a little less). A progress bar on stderr (on a terminal), a summary table at the
end. One tenant failing never stops the others: the exit status is then 1, naming them on
stderr; 2 for an unknown tenant or a bad configuration; 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.table import Table
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.sql.dml import UpdateBase

from app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    FULL_SUMMARY_LIMIT,
    configure_logging,
    console,
    positive_int,
    progress_bar,
    run_command,
)
from app.db.session import dispose_router, get_db_context, get_router
from app.models import Item
from pg_session_router.core.errors import DatabaseUnavailableError, UnknownTenantError
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.tenancy import Placement

EXAMPLE = """python -m app.scripts.backfill --dry-run             # what would change, everywhere
  python -m app.scripts.backfill                       # every active tenant
  python -m app.scripts.backfill --tenant acme --tenant globex --batch-size 1000"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the backfill did (or, in a dry run, would do) in one tenant."""

    tenant: str
    strategy: str
    rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


# -- the SQL ---------------------------------------------------------------------------------


def normalised_name() -> ColumnElement[str]:
    """The name without surrounding whitespace, each inner run of whitespace one space."""
    return func.btrim(func.regexp_replace(Item.name, r"\s+", " ", "g"))


def pending() -> ColumnElement[bool]:
    """Rows whose name still needs normalising (what makes the backfill resumable)."""
    return Item.name != normalised_name()


def normalise_batch(after: int | None, size: int) -> UpdateBase:
    """Normalise the next `size` pending rows after the keyset position `after` (None: from
    the start), returning their ids."""
    batch = select(Item.id).where(pending()).order_by(Item.id).limit(size)
    if after is not None:
        batch = batch.where(Item.id > after)
    return (
        update(Item)
        .where(Item.id.in_(batch))
        .values(name=normalised_name())
        .returning(Item.id)
        .execution_options(synchronize_session=False)
    )


# -- one tenant ------------------------------------------------------------------------------


async def count_pending(tenant: str) -> int:
    """Dry run: the rows that would change, counted on a replica."""
    async with get_db_context(tenant=tenant, read_only=True) as session:
        count = await session.scalar(select(func.count()).select_from(Item).where(pending()))
    return count or 0


async def run_batch(tenant: str, after: int | None, size: int) -> list[int]:
    """One batch, its own unit of work on the tenant's primary: the ids it changed."""
    async with get_db_context(tenant=tenant) as session:
        return list(await session.scalars(normalise_batch(after, size)))  # committed on exit


async def backfill_tenant(
    placement: Placement,
    batch_size: int,
    *,
    dry_run: bool,
    on_rows: Callable[[int], object] = lambda rows: None,
) -> Outcome:
    """Backfill one tenant; what goes wrong is its outcome's error, never raised."""
    tenant, strategy = placement.tenant_id, placement.strategy
    if not placement.active:
        return Outcome(tenant, strategy, skipped="disabled")
    started = time.perf_counter()
    rows = batches = 0
    try:
        if dry_run:
            rows = await count_pending(tenant)
            batches = math.ceil(rows / batch_size)
        else:
            after: int | None = None
            while changed := await run_batch(tenant, after, batch_size):
                rows, batches, after = rows + len(changed), batches + 1, max(changed)
                on_rows(rows)
    except Exception as exc:  # this tenant failed; the others go on
        error = describe_error(exc)
        return Outcome(tenant, strategy, rows, batches, time.perf_counter() - started, error=error)
    return Outcome(tenant, strategy, rows, batches, time.perf_counter() - started)


# -- every tenant ----------------------------------------------------------------------------


async def choose_tenants(router: SessionRouter, named: Sequence[str] | None) -> list[Placement]:
    """The named tenants (each must exist), else every tenant, configured and catalogued."""
    if router.tenants.catalog is not None:
        await router.tenants.reload()
        if router.tenants.catalog_unreachable:
            raise DatabaseUnavailableError("the tenant catalog is unreachable: no tenant list")
    known = {placement.tenant_id: placement for placement in router.tenants}
    if not named:
        return list(known.values())
    unknown = [tenant for tenant in named if tenant not in known]
    if unknown:
        raise UnknownTenantError(f"unknown tenant {', '.join(map(repr, unknown))}")
    return [known[tenant] for tenant in dict.fromkeys(named)]


async def backfill_all(
    placements: Sequence[Placement], batch_size: int, *, dry_run: bool
) -> list[Outcome]:
    progress = progress_bar()
    outcomes = []
    with progress:
        task = progress.add_task("backfill", total=len(placements))
        for placement in placements:

            def show(rows: int, tenant: str = placement.tenant_id) -> None:
                progress.update(task, description=f"backfill {tenant}: {rows} rows")

            show(0)
            outcome = await backfill_tenant(placement, batch_size, dry_run=dry_run, on_rows=show)
            outcomes.append(outcome)
            progress.advance(task)
    return outcomes


async def _run_and_dispose(args: argparse.Namespace) -> list[Outcome]:
    try:
        router = get_router()
        # One probe round first (roles and replay lag known), which also refuses row tenants
        # that row-level security would not confine.
        await router.start()
        placements = await choose_tenants(router, args.tenant)
        return await backfill_all(placements, args.batch_size, dry_run=args.dry_run)
    finally:
        await dispose_router()


# -- the command -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.scripts.backfill",
        description="Normalise the whitespace of item names in every tenant, in batches "
        "(resumable: run it again to continue).",
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tenant", action="append", metavar="ID", help="only this tenant (repeatable)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=500, metavar="N", help="rows per batch (500)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count the rows that would change; change none"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(debug=args.debug)
    return run_command(lambda: _backfill(args), debug=args.debug)


def _backfill(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    outcomes = asyncio.run(_run_and_dispose(args))
    return report(outcomes, dry_run=args.dry_run, seconds=time.perf_counter() - started)


def report(outcomes: Sequence[Outcome], *, dry_run: bool, seconds: float) -> int:
    """The summary table and totals on stdout, the failed tenants on stderr: the exit status."""
    out = console()
    out.print(_summary(outcomes, dry_run=dry_run))
    out.print(_totals(outcomes, dry_run=dry_run, seconds=seconds), markup=False, highlight=False)
    failed = [outcome.tenant for outcome in outcomes if outcome.failed]
    if failed:
        message = f"failed: {', '.join(failed)} (a re-run continues where they stopped)"
        console(stderr=True).print(message, markup=False, highlight=False)
        return EXIT_FAILED
    return EXIT_OK


def _summary(outcomes: Sequence[Outcome], *, dry_run: bool) -> Table:
    table = Table(title="backfill: normalise item names" + (" (dry run)" if dry_run else ""))
    columns = ("tenant", "strategy", "would change" if dry_run else "rows changed", "batches")
    for column in columns[:2]:
        table.add_column(column, no_wrap=True)
    for column in (*columns[2:], "time"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("result")
    shown = list(outcomes)
    if len(shown) > FULL_SUMMARY_LIMIT:
        shown = [o for o in shown if o.rows or o.failed or o.skipped]
    for o in shown:
        time_taken = "-" if o.skipped else f"{o.seconds * 1000:.0f} ms"
        numbers = ("-", "-") if o.skipped else (str(o.rows), str(o.batches))
        table.add_row(o.tenant, o.strategy, *numbers, time_taken, _result(o, dry_run=dry_run))
    return table


def _result(outcome: Outcome, *, dry_run: bool) -> str:
    if outcome.skipped:
        return f"skipped: {outcome.skipped}"
    if outcome.error is not None:
        return f"FAILED: {outcome.error}"
    if outcome.rows == 0:
        return "nothing to do"
    return "would change" if dry_run else "done"


def _totals(outcomes: Sequence[Outcome], *, dry_run: bool, seconds: float) -> str:
    rows = sum(outcome.rows for outcome in outcomes)
    done = (
        f"{rows} rows would change (dry run: nothing changed)"
        if dry_run
        else f"{rows} rows changed"
    )
    parts = [f"{done} in {len(outcomes)} tenants in {seconds:.1f} s"]
    skipped = sum(1 for outcome in outcomes if outcome.skipped)
    failed = sum(1 for outcome in outcomes if outcome.failed)
    if skipped:
        parts.append(f"{skipped} skipped (disabled)")
    if failed:
        parts.append(f"{failed} failed")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
