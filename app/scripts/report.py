"""`python -m app.scripts.report --tenant ID`: one tenant's items, read from a replica.

The router outside a request and outside the `python -m app` commands: a script opens one unit
of work with `get_db_context(tenant=..., read_only=True)`, which goes to a fresh replica of the
tenant's cluster (the primary, in a READ ONLY transaction, when none is fresh). The session is
confined to the tenant (its own database, its schema's `search_path`, or row-level security),
so the queries just name `Item`.

Prints a table of the tenant's newest items, titled with the tenant and its item count, and
the node that served the read. Exit 0 done, 2 for an unknown tenant or a bad configuration, 1
when the database fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select

from app.cli.common import EXIT_OK, configure_logging, console, positive_int, run_command
from app.db.session import dispose_router, get_db_context, get_router
from app.models import Item

EXAMPLE = """APP_CONFIG_FILE=config/settings.toml python -m app.scripts.report --tenant acme
  python -m app.scripts.report --tenant initech --limit 50"""


@dataclass(frozen=True, slots=True)
class Report:
    """What one read of a tenant found."""

    tenant: str
    count: int
    newest: list[tuple[int, str]]
    node: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.scripts.report",
        description="A tenant's newest items and item count, read from a replica.",
        epilog=f"example:\n  {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tenant", required=True, metavar="ID", help="the tenant to report on")
    parser.add_argument(
        "--limit", type=positive_int, default=10, metavar="N", help="newest items shown (10)"
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(debug=args.debug)
    return run_command(lambda: _report(args.tenant, args.limit), debug=args.debug)


def _report(tenant: str, limit: int) -> int:
    report = asyncio.run(_read_and_dispose(tenant, limit))
    out = console()
    out.print(_table(report))
    out.print(f"read from {report.node}", markup=False, highlight=False)
    return EXIT_OK


async def _read_and_dispose(tenant: str, limit: int) -> Report:
    try:
        # One probe round first, so the read knows which servers are fresh replicas.
        await get_router().start()
        return await read_report(tenant, limit)
    finally:
        await dispose_router()


async def read_report(tenant: str, limit: int) -> Report:
    """The tenant's item count and newest `limit` items, in one read-only unit of work."""
    async with get_db_context(tenant=tenant, read_only=True) as session:
        count = await session.scalar(select(func.count()).select_from(Item))
        rows = await session.execute(
            select(Item.id, Item.name).order_by(Item.id.desc()).limit(limit)
        )
        newest = [(row.id, row.name) for row in rows]
        node = str(session.info["node"])
    return Report(tenant, count or 0, newest, node)


def _table(report: Report) -> Table:
    noun = "item" if report.count == 1 else "items"
    shown = len(report.newest)
    caption = f"the newest {shown} of {report.count}" if shown < report.count else None
    title = f"tenant {report.tenant}: {report.count} {noun}"
    # Wide enough for the title and caption on one line each, however short the names.
    width = max(len(title), len(caption or "")) + 4
    table = Table(title=title, caption=caption, min_width=width)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("name")
    for item_id, name in report.newest:
        table.add_row(str(item_id), Text(name))  # names are data, never markup
    return table


if __name__ == "__main__":
    sys.exit(main())
