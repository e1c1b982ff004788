"""`python -m app tenants add | list | disable | enable | remove`: tenants at runtime.

`add` creates the tenant's storage and brings it to the Alembic head with the same code as
`python -m app migrate`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.cli.common import EXIT_OK, command_parser, positive_int
from app.cli.moves import add_move_commands, run_drop_moved, run_move
from app.core.config import load_settings
from app.db.migrate import app_migrations
from app.models import Base
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter
from pg_session_router.migrations import alembic_migrator

EXAMPLE = """python -m app tenants add acme --strategy schema
  python -m app tenants add umbrella --strategy database --database umbrella
  python -m app tenants list
  python -m app tenants disable acme
  python -m app tenants remove acme --drop
  python -m app tenants move acme --to second"""


def add_tenant_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = command_parser(
        commands, "tenants", "add, list, disable, enable, remove, move", EXAMPLE
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="tenants from the configuration and the catalog, a page at a time"
    )
    listing.add_argument("--limit", type=positive_int, default=1000, help="catalog rows per page")
    listing.add_argument("--after", help="start after this tenant id (the last one shown)")
    add = actions.add_parser("add", help="create storage, migrate, register in the catalog")
    add.add_argument("tenant_id")
    add.add_argument("--strategy", choices=["database", "schema", "row"], required=True)
    add.add_argument("--database", help="database: its database on the cluster")
    add.add_argument("--cluster", help="the cluster (default: the default cluster)")
    add.add_argument("--url", help="database: a server of its own")
    add.add_argument("--schema", help="schema: the schema name (default: the tenant id)")
    add.add_argument(
        "--adopt",
        action="store_true",
        help="use a database or schema that exists already (it must be this tenant's)",
    )
    for name in ("disable", "enable"):
        actions.add_parser(name).add_argument("tenant_id")
    remove = actions.add_parser("remove", help="unregister (and with --drop, delete its data)")
    remove.add_argument("tenant_id")
    remove.add_argument(
        "--drop",
        action="store_true",
        help="delete its data: its database, its schema, or (row tenants) its rows",
    )
    add_move_commands(actions)


def run_tenants(args: argparse.Namespace) -> int:
    return asyncio.run(_tenants(args))


async def _tenants(args: argparse.Namespace) -> int:
    router = SessionRouter.from_settings(load_settings())
    try:
        if args.action == "list":
            page = await provisioning.list_tenants(router, after=args.after, limit=args.limit)
            for info in page.tenants:
                state = "active" if info.settings.active else "disabled"
                print(f"{info.tenant_id}\t{info.settings.strategy}\t{state}\t{info.source}")
            if page.next_after is not None:
                print(
                    f"more: python -m app tenants list --after {page.next_after}", file=sys.stderr
                )
        elif args.action == "add":
            await _add(router, args)
            print(f"added tenant {args.tenant_id} ({args.strategy})")
        elif args.action == "move":
            await run_move(router, args)
        elif args.action == "drop-moved":
            await run_drop_moved(router, args)
        elif args.action in ("disable", "enable"):
            await provisioning.set_active(router, args.tenant_id, active=args.action == "enable")
            print(f"{args.action}d tenant {args.tenant_id}")
        else:
            removed = await provisioning.remove_tenant(
                router, args.tenant_id, drop=args.drop, metadata=Base.metadata
            )
            print(
                f"removed tenant {args.tenant_id}" + (f"; {removed.describe()}" if removed else "")
            )
    finally:
        await router.dispose()
    return EXIT_OK


async def _add(router: SessionRouter, args: argparse.Namespace) -> None:
    fields = {
        "strategy": args.strategy,
        "database": args.database,
        "cluster": args.cluster,
        "url": args.url,
        "schema": args.schema,
    }
    tenant = TenantSettings.model_validate({k: v for k, v in fields.items() if v})
    await provisioning.add_tenant(
        router,
        args.tenant_id,
        tenant,
        metadata=Base.metadata,
        adopt=args.adopt,
        migrator=alembic_migrator(app_migrations()),
    )
