"""`RoutedSession`: the sync session behind every routed `AsyncSession`, and its listeners.

What a session does beyond SQLAlchemy's own: it runs its tenant's setup at the start of every
transaction (schema and row tenants), marks every object it loads or saves with its tenant and
refuses objects of another tenant, reads a write's WAL position right after its COMMIT when a
consistency token is wanted, hands a statement that finds its connection dead to the unit of
work's replay, checks a write out before its first flush (where a refusal can be retried), and
lets `session.begin()` take over the transaction a read began while it waited on a replica
for its consistency token (so the SQLAlchemy idiom `async with db.begin():` works there too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.orm import InstanceState, Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state

from pg_session_router.core.errors import CrossTenantError
from pg_session_router.db.consistency import read_wal_position
from pg_session_router.db.tenancy import ROW_TENANT_SETTING, SERVED_TENANT_SETTING

logger = logging.getLogger(__name__)

_O = TypeVar("_O", bound=object)


class RoutedSession(Session):
    """The sync session behind every routed `AsyncSession`; one tenant for its whole life.

    `connection_setup` is the statement that sets a pooled connection up for a tenant placed by
    schema or by row (see `tenancy`), sent only when the connection served someone else before;
    it is None for everything else. `tenant_id` marks every object the session loads or saves,
    and objects marked for another tenant are refused.
    """

    connection_setup: str | None = None
    #: Behind a transaction-mode pooler: the tenant's settings for each transaction alone,
    #: sent inside it (one statement more per transaction); nothing is left on a connection.
    transaction_setup: str | None = None
    per_transaction: bool = False
    tenant_id: str | None = None
    #: Set around a COMMIT whose WAL position is wanted (a consistency token): the connection
    #: to read it on, after the COMMIT but before the connection goes back to the pool.
    position_connection: Connection | None = None
    #: The WAL position read after the last such COMMIT, or None if it could not be read.
    committed_position: int | None = None

    #: The transaction the router began while a read waited on a replica for its token;
    #: `begin()` hands it over once instead of raising "a transaction is already begun".
    adoptable_transaction: SessionTransaction | None = None
    #: Where the session is bound now (`routing.Route`); a replay may move it.
    route: Any = None
    #: Set by the unit of work: runs a statement again on a fresh connection when its
    #: connection died (see `SessionOpener.replay_statement`). None: no replay.
    replay: Callable[[RoutedSession, Callable[[], Any], Exception, bool, float], Any] | None = None
    #: Set by the unit of work for writes: checks out before a write's first flush, where a
    #: server that cannot be reached is retried (`SessionOpener.check_out_first`).
    first_checkout: Callable[[RoutedSession], None] | None = None
    #: Statements this session has sent: `execute()` and friends, and flushes (never reset:
    #: a write replays only a statement nothing was sent before).
    statements_run: int = 0
    #: The caller used a connection directly (`session.connection()`), or is inside its own
    #: `session.begin()` block: what was sent is not known, so nothing is replayed.
    opaque: bool = False

    @cached_property
    def info(self) -> dict[Any, Any]:
        """SQLAlchemy's `Session.info`, with the node the session went to and why
        (`"node"`, `"route_reason"`): built on first use, since most sessions never read it."""
        route = self.route
        if route is None:
            return {}
        return {"node": route.node.name, "route_reason": route.reason}

    def _execute_internal(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        """Every statement of `execute()`, `scalar()`, `scalars()`, `get()` and lazy loads
        (not the flush's): a failure is handed to the unit of work's replay, which runs the
        statement again or raises.

        An override of SQLAlchemy's private entry point rather than a `do_orm_execute`
        listener: with any such listener, SQLAlchemy builds an `ORMExecuteState` and runs the
        ORM pre-execution (autoflush, load options) twice for every statement, and re-enters
        this method through `invoke_statement()`, for every statement. The replay tests fail
        if a SQLAlchemy release renames it."""
        replay = self.replay
        if replay is None or kwargs.get("_parent_execute_state") is not None:
            # No replay, or a statement re-invoked by a do_orm_execute hook of the host's
            # inside a statement this method already watches.
            return Session._execute_internal(self, statement, params, **kwargs)
        # Pending ORM changes would be flushed (sent) by this very statement's autoflush, and
        # lost by a rollback: such a statement is never a write's first. Only a write's first
        # statement needs the answer (a read replays whatever it sent); `_is_clean()` is
        # private, but three truth tests where the public new/dirty/deleted build sets.
        clean = self.first_checkout is not None and self.statements_run == 0 and self._is_clean()
        started = time.monotonic()  # a replay's deadline counts from the first attempt
        try:  # Session's, not super()'s: a super object per statement is measurable here
            result = Session._execute_internal(self, statement, params, **kwargs)
        except Exception as exc:  # connect errors come unwrapped (OSError), the rest DBAPIError

            def again() -> Any:
                return Session._execute_internal(self, statement, params, **kwargs)

            result = replay(self, again, exc, clean, started)
        self.statements_run += 1
        return result

    def _flush(self, objects: Any = None) -> None:
        # A write's first contact with the server may be this flush (add(), then COMMIT):
        # nothing sent yet, so the checkout is made first, where failing is retried. The
        # private `_flush` rather than `flush()`: SQLAlchemy calls it only when there is
        # something to flush, where `flush()` runs before every statement (autoflush).
        self.check_out_first()
        super()._flush(objects)

    def check_out_first(self) -> None:
        """Before a write sends anything (its first flush, or the router's checkout for a
        consistency token): check out where a refusal is retried. Nothing when a statement
        ran already, or the caller holds the connection (`connection()`, `begin()`)."""
        if self.first_checkout is not None and self.statements_run == 0 and not self.opaque:
            self.first_checkout(self)

    def connection(self, *args: Any, **kwargs: Any) -> Connection:
        self.opaque = True  # the caller's own use: what it sends is not known to the router
        return super().connection(*args, **kwargs)

    def begin(self, nested: bool = False) -> SessionTransaction:
        self.opaque = True
        adoptable, self.adoptable_transaction = self.adoptable_transaction, None
        if not nested and adoptable is not None and adoptable is self.get_transaction():
            # Nothing has run in it but the router's checkout (and tenant setup): to the caller
            # it is a fresh transaction, which `with session.begin():` commits at its end.
            return adoptable
        return super().begin(nested)

    def merge(self, instance: _O, *args: Any, **kwargs: Any) -> _O:
        _refuse_foreign(self, instance)
        return super().merge(instance, *args, **kwargs)


def _refuse_foreign(session: RoutedSession, instance: object) -> None:
    owner = instance_state(instance).info.get("tenant")
    if owner is not None and owner != session.tenant_id:
        raise CrossTenantError(
            f"an object of tenant {owner!r} cannot join a session of "
            f"{session.tenant_id or 'no tenant'!r}: sessions never mix tenants"
        )


@event.listens_for(RoutedSession, "after_flush")
def _count_flush(session: RoutedSession, flush_context: Any) -> None:
    session.statements_run += 1


@event.listens_for(RoutedSession, "before_attach")
def _check_attach(session: RoutedSession, instance: object) -> None:
    _refuse_foreign(session, instance)


@event.listens_for(RoutedSession, "loaded_as_persistent", raw=True)
@event.listens_for(RoutedSession, "pending_to_persistent", raw=True)
def _mark_tenant(session: RoutedSession, state: InstanceState[Any]) -> None:
    # Runs for every loaded object of every session: the cheapest possible. `raw=True` hands
    # over the object's state, where the mark lives: without it SQLAlchemy wraps the listener
    # to turn the state into the object (a third of a row's load cost, 10 rows: ~550 opcodes).
    tenant = session.tenant_id
    if tenant is not None:
        state.info["tenant"] = tenant


@event.listens_for(RoutedSession, "after_begin")
def _run_transaction_setup(
    session: RoutedSession, transaction: SessionTransaction, connection: Connection
) -> None:
    # Runs when a transaction begins, before any statement of the caller's (and before the
    # BEGIN itself, which SQLAlchemy's asyncpg dialect sends with the first statement), so ORM
    # statements and raw text() alike see only the tenant's schema or rows.
    if session.per_transaction:
        # Behind a transaction pooler the server connection may come with another client's
        # session-level settings: a tenant-less transaction clears the tenant ones too.
        connection.exec_driver_sql(session.transaction_setup or NO_TENANT_TRANSACTION_SETUP)
        return
    info = connection.connection.info
    # Keyed on the setup too: a tenant removed and added again elsewhere gets set up anew.
    owner = None if session.tenant_id is None else (session.tenant_id, session.connection_setup)
    previous = info.get(OWNER_KEY, _FRESH)
    if previous != owner:
        prepare_connection(connection, reset=previous is not _FRESH, setup=session.connection_setup)
        info[OWNER_KEY] = owner


#: Behind a transaction pooler, what a transaction without a tenant starts with: the default
#: search path (the role's or database's, as RESET would give) and no tenant, for itself only.
NO_TENANT_TRANSACTION_SETUP = (
    "SELECT set_config('search_path', "
    "(SELECT reset_val FROM pg_settings WHERE name = 'search_path'), true), "
    f"set_config('{SERVED_TENANT_SETTING}', '', true), set_config('{ROW_TENANT_SETTING}', '', true)"
)
#: Whom a pooled connection is set up for, in its info: (tenant id, setup), None (no tenant),
#: or `UNKNOWN_OWNER` (handed to a user outside the router, e.g. `engine.connect()`).
OWNER_KEY = "pg_session_router.owner"
UNKNOWN_OWNER = "<unknown>"
_FRESH = object()  # a new connection: nobody's state to reset
# What a unit of work may leave on its connection beyond its transaction (the pool's own reset
# is a ROLLBACK): session-level SETs, temporary tables, LISTENs, advisory locks, cursors.
_RESET_SQL = (
    "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL; DISCARD TEMP; DISCARD SEQUENCES; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all(); CLOSE ALL"
)


def hand_out_raw(connection: Connection) -> None:
    """A connection leaves the router's hands (`engine.connect()`: a host's raw use of the
    seed's `engine`, the catalog, checks, migrations): it starts with nobody's tenant state,
    and whatever its user leaves on it is reset before the next routed owner."""
    info = connection.connection.info
    if info.get(OWNER_KEY) is not None:  # a tenant's, or unknown
        prepare_connection(connection, reset=True, setup=None)
    info[OWNER_KEY] = UNKNOWN_OWNER


def prepare_connection(connection: Connection, *, reset: bool, setup: str | None) -> None:
    """Clear what another owner may have left, and set the connection up for its new owner.

    One round trip (a simple-query batch), only when a pooled connection changes hands between
    tenants, or comes back from use outside the router. It runs on the asyncpg connection
    outside any transaction: DISCARD cannot run inside one, and settings made there last.
    """
    batch = "; ".join(sql for sql in (_RESET_SQL if reset else None, setup) if sql)
    if batch:
        connection.connection.dbapi_connection.run_async(  # type: ignore[union-attr]
            lambda driver: driver.execute(batch)
        )


@event.listens_for(RoutedSession, "after_commit")
def _read_commit_position(session: RoutedSession) -> None:
    # after_commit runs once the COMMIT succeeded and while the session still holds the
    # connection: the position is read there on the asyncpg connection itself, outside any
    # transaction (no BEGIN, no pool checkout). One attribute read for every other commit.
    connection = session.position_connection
    if connection is None:
        return
    session.committed_position = None
    try:
        session.committed_position = read_wal_position(connection)
    except Exception:
        # The write is committed: failing to read its position must not turn it into an error.
        logger.warning("no consistency token after a committed write", exc_info=True)
