"""What a driver error means: the one module that classifies them.

Three questions, answered from exception types and SQLSTATEs (walking `orig` and `__cause__`,
since SQLAlchemy wraps the adapted asyncpg error, which wraps asyncpg's own):

- `is_connect_failure`: we never got a usable connection (refused, reset, timed out, the server
  is starting or shutting down, too many connections). Nothing ran, so any unit of work may be
  retried, on another node when there is one.
- `is_connection_loss`: an established connection died. The server rolls back the open
  transaction, so read-only work may be replayed; a COMMIT in flight has an unknown outcome.
- `is_read_retryable`: the above, or a replica cancelled our query for a recovery conflict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from pg_session_router.core.errors import (
    ConnectionLostError,
    NoNodeAvailableError,
    TenantMovingError,
    TopologyChangedError,
)

# Class 08 (connection exception), 57P01-57P03 (admin/crash shutdown, cannot connect now),
# 53300 (too many connections).
_CONNECT_SQLSTATES = frozenset(
    {"08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03", "53300"}
)
_LOSS_SQLSTATES = frozenset({"08000", "08003", "08006", "08007", "57P01", "57P02"})
_RECOVERY_CONFLICT_SQLSTATES = frozenset({"40001", "40P01"})
#: The server is alive but busy: retry elsewhere, but do not eject it.
#: A refused password (28P01) too: the server is up, our secret may be mid-rotation.
NO_EJECT_SQLSTATES = frozenset({"53300", "28P01"})
# Only ever raised while connecting: cannot connect now, too many connections, rejected.
_CONNECT_ONLY_SQLSTATES = frozenset({"57P03", "53300", "08001", "08004", "28P01"})
#: The server refused our credentials (invalid_authorization_specification, invalid_password):
#: a secret mid-rotation, when it comes from a provider, which the next attempt reads again.
CREDENTIALS_SQLSTATES = frozenset({"28P01"})
#: read_only_sql_transaction: a write in a read-only transaction, or on a standby.
READ_ONLY_SQLSTATE = "25006"
UNDEFINED_TABLE_SQLSTATE = "42P01"
#: Raised by the fence a tenant move leaves on the old storage (class 55, object not in
#: prerequisite state): the write reached storage the tenant has left; nothing was written.
TENANT_MOVED_SQLSTATE = "55R01"

_LOSS_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    ConnectionError,
)


class EjectedWhileWaitingError(OSError):
    """Raised by a node's pool: a checkout waiting for a free connection gave up because the
    node's server was ejected meanwhile. Nothing was sent: like a refused connect, the router
    replays the statement elsewhere or answers 503 (`translate`); a host's raw
    `engine.connect()` gets it as it would get a refused connect. A plain `OSError`, not a
    `ConnectionError`: no connection was lost. It does not eject the server again (which
    would push its re-admission trial out), and a replay's deadline counts from it, not from
    the statement's start (the wait in the pool was not an attempt)."""


class PoolRetiredError(EjectedWhileWaitingError):
    """Raised by a node's pool that was disposed while a checkout waited in its line (see
    `pool.RouterPool`): nothing was sent; handled as `EjectedWhileWaitingError` is (the
    statement is replayed on a fresh checkout, the server is not ejected)."""


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = current.orig if isinstance(current, DBAPIError) else None
        current = orig if isinstance(orig, BaseException) else current.__cause__


def sqlstate(exc: BaseException) -> str | None:
    for error in error_chain(exc):
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def describe_error(exc: BaseException | None) -> str:
    """Text safe for logs and messages: the class and the first line of the message.

    Driver and server messages name hosts, users and databases, never passwords.
    """
    if exc is None:
        return "no attempt made"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def is_connection_loss(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionLostError):
        return True
    for error in error_chain(exc):
        if isinstance(error, _LOSS_TYPES):
            return True
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, asyncpg.exceptions.InterfaceError) and "closed" in str(error):
            return True
    return sqlstate(exc) in _LOSS_SQLSTATES


def is_connect_failure(exc: BaseException) -> bool:
    """True for failures while obtaining a connection (the caller knows it was that phase)."""
    if isinstance(exc, NoNodeAvailableError | PoolTimeoutError):
        return True
    for error in error_chain(exc):
        if isinstance(error, OSError | asyncio.TimeoutError | asyncpg.exceptions.InterfaceError):
            return True
    code = sqlstate(exc)
    return is_connection_loss(exc) or code in _CONNECT_SQLSTATES or code in CREDENTIALS_SQLSTATES


def is_read_retryable(exc: BaseException) -> bool:
    return (
        is_connect_failure(exc)
        or is_connection_loss(exc)
        or sqlstate(exc) in _RECOVERY_CONFLICT_SQLSTATES
    )


def is_write_retryable(exc: BaseException) -> bool:
    """A write unit may be replayed only when it provably never committed.

    `ConnectionLostError` is raised only for a loss *before* COMMIT was sent (the server then
    rolls the transaction back); a loss during COMMIT is `CommitOutcomeUnknownError`, never
    replayed.
    """
    return isinstance(
        exc, NoNodeAvailableError | TopologyChangedError | ConnectionLostError | TenantMovingError
    )


def is_connect_refusal(exc: BaseException) -> bool:
    """A connection could not be had at all (refused, unreachable, timed out, the server
    starting or shutting down, too many connections): nothing was sent on it. Narrower than
    `is_connect_failure`, for errors raised while a statement runs (a busy connection's
    InterfaceError is not one)."""
    if sqlstate(exc) in _CONNECT_ONLY_SQLSTATES:
        return True
    return any(isinstance(error, OSError) for error in error_chain(exc))


def server_refused(exc: BaseException) -> bool:
    """The server (not one stale connection) failed us: unreachable, timed out, or refusing;
    not merely busy (too many connections), which is retried elsewhere without ejecting it."""
    if any(isinstance(error, EjectedWhileWaitingError) for error in error_chain(exc)):
        return False
    return is_connect_refusal(exc) and sqlstate(exc) not in NO_EJECT_SQLSTATES
