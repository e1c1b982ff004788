"""Command line: `python -m app demo | serve | migrate | check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from app.core.config import load_settings
from pg_session_router.core.errors import ConfigError, RouterError
from pg_session_router.core.settings import format_validation_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="start a dev cluster, migrate it and serve the app")
    demo_cmd.add_argument("--port", type=int, default=8000)
    demo_cmd.add_argument("--replicas", type=int, default=2)
    serve_cmd = commands.add_parser(
        "serve", help="serve app.main:app with the configured databases"
    )
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    commands.add_parser("migrate", help="create the example tables everywhere")
    add_tenant_commands(commands.add_parser("tenants", help="add, list, disable, remove tenants"))
    commands.add_parser("check", help="validate the configuration and print it (no secrets)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from app.demo import run_demo

            return run_demo(port=args.port, replicas=args.replicas)
        if args.command == "serve":
            return serve(args.host, args.port)
        if args.command == "migrate":
            return asyncio.run(migrate())
        if args.command == "tenants":
            return asyncio.run(tenants(args))
        return check()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except RouterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"invalid input: {format_validation_error(exc)}", file=sys.stderr)
        return 2


def check() -> int:
    settings = load_settings()
    print(settings.model_dump_json(indent=2, by_alias=True))
    return 0


async def migrate() -> int:
    from app.db.migrate import migrate_everything

    for label in await migrate_everything():
        print(f"migrated {label}")
    return 0


def add_tenant_commands(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every tenant, from the configuration and the catalog")
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


async def tenants(args: argparse.Namespace) -> int:
    from app.models import Base
    from pg_session_router.core.settings import TenantSettings
    from pg_session_router.db import provisioning
    from pg_session_router.db.router import SessionRouter

    router = SessionRouter.from_settings(load_settings())
    try:
        if args.action == "list":
            for info in await provisioning.list_tenants(router):
                state = "active" if info.settings.active else "disabled"
                print(f"{info.tenant_id}\t{info.settings.strategy}\t{state}\t{info.source}")
        elif args.action == "add":
            fields = {
                "strategy": args.strategy,
                "database": args.database,
                "cluster": args.cluster,
                "url": args.url,
                "schema": args.schema,
            }
            tenant = TenantSettings.model_validate({k: v for k, v in fields.items() if v})
            await provisioning.add_tenant(
                router, args.tenant_id, tenant, metadata=Base.metadata, adopt=args.adopt
            )
            print(f"added tenant {args.tenant_id} ({args.strategy})")
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
    return 0


def serve(host: str, port: int) -> int:
    import uvicorn

    load_settings()  # fail here, with the key named, rather than inside uvicorn's startup
    uvicorn.run("app.main:app", host=host, port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
