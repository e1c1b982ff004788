"""Command line: `python -m app demo | serve | migrate | check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from app.core.config import load_settings
from app.db.errors import ConfigError


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
        return check()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def check() -> int:
    settings = load_settings()
    print(settings.model_dump_json(indent=2, by_alias=True))
    return 0


async def migrate() -> int:
    from app.db.migrate import migrate as migrate_all
    from app.db.router import SessionRouter

    router = SessionRouter.from_settings(load_settings())
    try:
        for label in await migrate_all(router):
            print(f"migrated {label}")
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
