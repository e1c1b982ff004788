"""`RouterPool`: the connection pool of every node, and what each checkout checks.

SQLAlchemy's asyncio queue pool, with three things added as methods rather than as pool event
listeners: a checkout listener sends every checkout through the event dispatch and the pool's
checkout-retry loop, a cost paid by every session.

- Checkouts and the seconds they waited (for a free connection, or for a new one to connect)
  are counted: two clock reads per checkout that found no idle connection. Counts start
  again when the pool is recreated (`engine.dispose()`).
- A connection the server already closed is never handed out. When a server restarts or
  terminates our backends it closes the sockets, and asyncpg marks those connections closed as
  soon as the event loop reads the EOF: checking that flag costs no round trip (unlike
  pre-ping). Every connection pooled before it is recycled too (after a restart they are all
  dead), as SQLAlchemy's own pre-ping does on a failed ping.
- A checkout of a full pool waits in line up to `pool.timeout`: a connection that comes back
  is handed to the session that has waited longest, never taken by one that came later (with
  SQLAlchemy's queue, a task that returns its connection and checks out again without
  yielding takes it back before the woken waiter runs). Every `WAIT_SLICE` seconds the waiter
  looks at what no queue waiter hears about. Its server was ejected: a waiter in a dead
  server's pool would otherwise wait out `pool.timeout`, or connect anew to the dying server
  (whose dropped SYNs cost seconds), where giving up lets the statement be replayed on a node
  that is up (a live connection returned meanwhile is still used). And a slot freed by a
  connect that failed, which wakes no waiter.
- A disposed pool (`Node.dispose()`: a drain, a tenant cluster evicted, the router disposed)
  is retired: the engine has a new one, yet sessions that checked out before still return
  their connections to this one, and sessions waiting in its line would connect anew in it.
  SQLAlchemy's queue pool keeps such connections open until the garbage collector finds the
  pool. A retired pool ends each connection as it comes back (counting those still out for
  `Node.in_use`), and its waiters are woken and give up (`PoolRetiredError`): the statement is
  replayed on a fresh checkout, on another node when the server was drained. A drained
  server's pool (the new one) keeps no idle connection either: one that comes back goes to a
  waiter (a session routed there before the drain) or is ended, and its slot reconnects if it
  is used again (such a session's next transaction, or after `undrain`).
- A connection idle longer than `ping_idle_after` answers a ping within `ping_within`
  seconds, or is replaced. A connection cut without a FIN looks alive (no EOF ever comes) and
  would hang the first statement sent on it until TCP gives up, minutes later; such cuts happen
  to idle connections (NAT and firewall timeouts), so only those pay the round trip. A
  replaced connection is invalidated (SQLAlchemy terminates it after a bounded close).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import await_only
from sqlalchemy.util.queue import Empty

from pg_session_router.db.driver_errors import EjectedWhileWaitingError, PoolRetiredError
from pg_session_router.db.health import ServerHealth

#: In a pooled connection's record: when it was last returned to the pool (monotonic).
_IDLE_SINCE = "pg_session_router.idle_since"
#: Why a connection is ended on its return (in SQLAlchemy's invalidation log line).
_RETIRED = DisconnectionError("the pool was disposed")
_DRAINED = DisconnectionError("the server is drained")
_RETIRED_WHILE_WAITING = "the pool was closed while waiting for a connection"

# SQLAlchemy names a pool's logger after its class, so ours falls outside the "sqlalchemy"
# logger, which SQLAlchemy sets to WARNING unless the application set a level: without the
# same default here, an application logging at INFO would get a line per connection ended
# (every session's end on a drained server). An explicit level of the application's stays.
_POOL_LOGGER = logging.getLogger(f"{__name__}.RouterPool")
if _POOL_LOGGER.level == logging.NOTSET:
    _POOL_LOGGER.setLevel(logging.WARNING)


def _closed_by_server(connection: Any) -> bool:
    """asyncpg read the EOF: known without a round trip."""
    driver = connection.driver_connection
    return driver is not None and bool(driver.is_closed())


def _needs_connect(record: ConnectionPoolEntry) -> bool:
    connection = record.dbapi_connection
    return connection is None or _closed_by_server(connection)


#: Seconds between two looks at the server's health while a checkout waits for a connection.
#: A wait shorter than this costs what SQLAlchemy's single wait costs.
WAIT_SLICE = 0.1


class RouterPool(AsyncAdaptedQueuePool):
    """See the module. Build a node's pool class with `configured()`: the settings live on
    the class because the pool recreates itself from its class (`engine.dispose()`)."""

    ping_idle_after: float | None = None
    ping_within: float = 5.0
    #: The health of the node's server (None: a pool outside a router, never given up on).
    health: ServerHealth | None = None
    checkouts = 0
    checkout_wait = 0.0
    #: Set by `dispose()`: the engine has a new pool, and nothing is pooled or connected here.
    retired = False
    #: Of a retired pool: connections its sessions still hold (`checkedout()` counts no more).
    held_after_retirement = 0
    #: Sessions waiting for a connection to come back, first come first; each is handed one.
    _waiters: deque[asyncio.Future[ConnectionPoolEntry | None]]

    @classmethod
    def configured(
        cls,
        *,
        ping_idle_after: float | None,
        ping_within: float,
        health: ServerHealth | None,
    ) -> type[RouterPool]:
        settings = {
            "ping_idle_after": ping_idle_after,
            "ping_within": ping_within,
            "health": health,
        }
        return type(cls.__name__, (cls,), settings)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiters = deque()

    def _do_get(self) -> ConnectionPoolEntry:
        self.checkouts += 1
        if not self._waiters and not self._pool.empty():
            record = super()._do_get()  # the common case: an idle connection, no wait
        else:
            started = time.perf_counter()
            try:
                record = self._connect_or_wait(started)
            finally:
                self.checkout_wait += time.perf_counter() - started
        connection = record.dbapi_connection
        if connection is not None:  # None: SQLAlchemy connects it anew before handing it out
            try:
                self._check_before_use(record, connection)
            except BaseException as exc:
                # Cancelled mid-ping, say: the record is out of the pool, and only what follows
                # `_do_get` in SQLAlchemy's checkout gives it back on failure. Invalidated and
                # returned here, as SQLAlchemy does when connecting fails.
                record._checkin_failed(exc, _fairy_was_created=False)  # type: ignore[attr-defined]
                raise
        return record

    def _connect_or_wait(self, started: float) -> ConnectionPoolEntry:
        # SQLAlchemy's checkout, minus its wait: a new connection while the pool has room
        # (an idle one if it has one and nobody waits: it is theirs). Else wait, in line.
        while True:
            if self.retired:
                # Disposed while this session waited: its engine has a new pool, and a new
                # connection made here would be nobody's to close.
                raise PoolRetiredError(_RETIRED_WHILE_WAITING)
            if (not self._pool.empty() and not self._waiters) or not self._full():
                return super()._do_get()  # no wait inside: idle, or room for a new one
            record = self._wait_for_return(started)
            if record is not None:
                return record
            # None: room for a new connection opened meanwhile (a connect failed).

    def _wait_for_return(self, started: float) -> ConnectionPoolEntry | None:
        """Wait in line (see the module) for the connection `_do_return_conn` hands over,
        within `pool.timeout`; None when a failed connect made room meanwhile."""
        waiter: asyncio.Future[ConnectionPoolEntry | None]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            while not waiter.done():
                remaining = self._timeout - (time.perf_counter() - started)
                if remaining <= 0:
                    break
                await_only(asyncio.wait((waiter,), timeout=min(WAIT_SLICE, remaining)))
                if self._ejected() or not self._full():  # (`dispose()` wakes its waiters)
                    break
        except BaseException:  # cancelled: a record handed over goes on to the next waiter
            taken = self._withdraw(waiter)
            if taken is not None:
                self._do_return_conn(taken)
            raise
        record = self._withdraw(waiter)
        if record is None and self.retired:  # woken by `dispose()`, whatever it did since
            raise PoolRetiredError(_RETIRED_WHILE_WAITING)
        if self._ejected() and (record is None or _needs_connect(record)):
            # Continuing would connect anew to a server that failed (a dying one may drop the
            # SYN, which the kernel sends again only a second later): the statement is replayed
            # on a node that is up instead. A live connection returned meanwhile is used.
            if record is not None:
                self._do_return_conn(record)
            raise EjectedWhileWaitingError(
                "the server was ejected while waiting for a pooled connection"
            )
        if record is not None or not self._full():
            return record
        raise PoolTimeoutError(
            f"no pooled connection came free within {self._timeout:g} s "
            f"(pool size {self.size()}, overflow {self._max_overflow})"
        )

    def _withdraw(
        self, waiter: asyncio.Future[ConnectionPoolEntry | None]
    ) -> ConnectionPoolEntry | None:
        """The record handed to `waiter`, or None (none was, or the pool retired meanwhile),
        after which it is out of the line."""
        if waiter.done():
            return waiter.result()
        self._waiters.remove(waiter)
        waiter.cancel()
        return None

    def _ejected(self) -> bool:
        return self.health is not None and not self.health.up

    def _full(self) -> bool:
        return -1 < self._max_overflow <= self._overflow

    def dispose(self) -> None:
        """Retire this pool: its idle connections end now (within SQLAlchemy's bounded
        invalidation: a graceful close would wait on a dead server), those still checked out
        as they come back; its waiters give up. SQLAlchemy's dispose, ending each connection
        by invalidation instead of a close."""
        if not self.retired:
            self.held_after_retirement = self.checkedout()
        self.retired = True
        # Waiters are woken now (with no connection: `_connect_or_wait` then raises
        # PoolRetiredError): left to their next look (`WAIT_SLICE`), each would stand idle
        # that long before its statement is replayed elsewhere.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.get_loop().is_closed():  # a pool outlived its loop: nobody waits
                waiter.set_result(None)
        while True:
            try:
                record = self._pool.get(False)
            except Empty:
                break
            record.invalidate(_RETIRED)
        self._overflow = 0 - self.size()

    def _dec_overflow(self) -> Any:
        if self.retired:  # a connect begun before the retirement failed: one fewer held
            self.held_after_retirement -= 1
        return super()._dec_overflow()

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if self.retired:  # nobody checks out here again: ended, and the record let go
            self.held_after_retirement -= 1
            record.invalidate(_RETIRED)
            return
        record.info[_IDLE_SINCE] = time.monotonic()
        waiters = self._waiters
        if waiters:  # straight to the session that has waited longest: it stays checked out
            waiters.popleft().set_result(record)
            return
        health = self.health
        if health is not None and health.drained:
            # Not kept idle on a server being taken out of service (a waiter above, routed
            # there before the drain, used it instead). Invalidated, the record stays a slot
            # of the pool and connects anew if used again; put back even when the bounded
            # close is cancelled midway, or the slot would be lost for good.
            try:
                record.invalidate(_DRAINED)
            finally:
                super()._do_return_conn(record)
            return
        super()._do_return_conn(record)

    def _check_before_use(self, record: ConnectionPoolEntry, connection: Any) -> None:
        """Runs in the checkout's greenlet. An invalidated record is connected anew by
        SQLAlchemy before it is handed out (within the checkout, so a failure to connect
        reaches the caller's first statement, which the router may replay)."""
        driver = connection.driver_connection
        if driver is not None and driver.is_closed():  # `_closed_by_server`, one frame less
            # Every connection pooled before now is recycled at its next checkout: what
            # SQLAlchemy's own pre-ping does after a failed ping (`Pool._invalidate`), with its
            # guard: only a connection newer than the last such mark moves it (after a restart,
            # each stale connection would otherwise also recycle the ones just made).
            if self._invalidate_time < record.starttime:  # type: ignore[attr-defined]
                self._invalidate_time = time.time()
            record.invalidate(DisconnectionError("the server closed this pooled connection"))
            return
        idle_after = self.ping_idle_after
        since = record.info.get(_IDLE_SINCE)
        if idle_after is None or since is None or time.monotonic() - since < idle_after:
            return
        within = self.ping_within
        try:
            connection.run_async(
                lambda driver: asyncio.wait_for(driver.fetchval("SELECT 1"), within)
            )
        except Exception as exc:
            record.invalidate(
                DisconnectionError(
                    f"a connection idle for {idle_after:g} s did not answer: {exc!r}"
                )
            )
