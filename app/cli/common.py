"""What every command shares: exit statuses, one-line errors, the consoles.

Exit statuses: 0 done, 1 a failure (a node unreachable, a target failed), 2 usage or
configuration (argparse's own status for bad arguments), 130 interrupted (Ctrl-C). Errors
are one line on stderr naming what and where; the traceback only with `--debug`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pg_session_router.core.errors import ConfigError, RouterError, TenantError
from pg_session_router.core.settings import format_validation_error
from pg_session_router.db.driver_errors import describe_error

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Beyond this many rows, summary tables list only what changed, failed or needs a look.
FULL_SUMMARY_LIMIT = 100
#: Ctrl-C, as shells report a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def console(*, stderr: bool = False) -> Console:
    """Rich output; wide and plain when not a terminal, so logs and pipes get whole lines."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(file=stream, width=None if terminal else 200, no_color=not terminal)


def configure_logging(*, debug: bool) -> None:
    """Warnings and errors on stderr (everything with `--debug`). Alembic's line per target
    only with `--debug`: the progress bar and the summary say it once."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.DEBUG if debug else logging.WARNING)


def progress_bar() -> Progress:
    """Progress on stderr, on a terminal only (pipes and logs get the summary alone)."""
    err = console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def run_command(command: Callable[[], int], *, debug: bool) -> int:
    """Run a command, turning what goes wrong into one line and an exit status (the same
    status with `debug`, which prints the traceback too)."""
    try:
        return command()
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EXIT_USAGE, debug)
    except ValidationError as exc:
        return _fail(f"invalid input: {format_validation_error(exc)}", EXIT_USAGE, debug)
    except TenantError as exc:  # unknown or invalid tenant id, conflicting tenant
        status = EXIT_USAGE if exc.status_code < 409 else EXIT_FAILED
        return _fail(f"error: {exc}", status, debug)
    except RouterError as exc:
        return _fail(f"error: {exc}", EXIT_FAILED, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, debug)
    except Exception as exc:  # a driver or OS error: say what, not where in the code
        hint = "" if debug else " (--debug for the traceback)"
        return _fail(f"error: {describe_error(exc)}{hint}", EXIT_FAILED, debug)


def _fail(message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return status


def command_parser(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    summary: str,
    example: str,
) -> argparse.ArgumentParser:
    """A subcommand whose `--help` ends with an example."""
    return commands.add_parser(  # type: ignore[no-any-return]
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number
