"""The reference app's command line: `python -m app COMMAND` (see `--help`).

One module per command family; `common` holds exit statuses and error reporting. Every
command's `--help` ends with an example.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator

from app.cli.check import run_check, run_config
from app.cli.common import command_parser, configure_logging, run_command
from app.cli.drain import add_drain_command, run_drain
from app.cli.migrate import add_migrate_command, run_migrate
from app.cli.tenants import add_tenant_commands, run_tenants


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.debug)
    return run_command(lambda: _dispatch(args, parser), debug=args.debug)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="The reference app of pg-session-router.",
        epilog="example:\n  python -m app demo\n  python -m app migrate --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = command_parser(
        commands,
        "demo",
        "start a dev cluster, migrate it and serve the app",
        "python -m app demo --port 8000",
    )
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--replicas", type=int, default=2)
    serve = command_parser(
        commands,
        "serve",
        "serve app.main:app with uvicorn on the configured databases",
        "APP_CONFIG_FILE=config/settings.toml python -m app serve --workers 4 --port 8000",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="processes (each its own pools)")
    serve.add_argument("--reload", action="store_true", help="restart on code changes (dev)")
    add_migrate_command(commands)
    add_tenant_commands(commands)
    add_drain_command(commands)
    command_parser(
        commands,
        "check",
        "probe every configured node: role, up or down, lag, version, pool",
        "python -m app check",
    )
    command_parser(
        commands,
        "config",
        "print the effective configuration (passwords masked)",
        "APP_CONFIG_FILE=prod.toml python -m app config",
    )
    return parser


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "demo":
        from app.demo import run_demo

        return run_demo(port=args.port, replicas=args.replicas)
    if args.command == "serve":
        if args.workers > 1 and args.reload:
            parser.error("serve: --reload and --workers do not go together")
        return _serve(args)
    if args.command == "migrate":
        return run_migrate(args, parser)
    if args.command == "tenants":
        return run_tenants(args)
    if args.command == "check":
        return run_check()
    if args.command == "drain":
        return run_drain(args)
    return run_config()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.config import load_settings

    settings = load_settings()  # fail here, with the key named, not in uvicorn's startup
    with _metrics_shared_by_workers(settings.http.metrics and args.workers > 1):
        uvicorn.run(
            "app.main:app",
            host=args.host,
            port=args.port,
            workers=args.workers,
            reload=args.reload,
        )
    return 0


@contextlib.contextmanager
def _metrics_shared_by_workers(needed: bool) -> Iterator[None]:
    """Several workers: each writes its metrics to one directory that every scrape
    aggregates (prometheus-client's multiprocess mode), unless the deployment chose one."""
    if not needed or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="pgrouter-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
