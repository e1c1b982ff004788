"""`RouterPool`: the connection pool of every node, and what each checkout checks.

SQLAlchemy's asyncio queue pool, with three things added as methods rather than as pool event
listeners: a checkout listener sends every checkout through the event dispatch and the pool's
checkout-retry loop, a cost paid by every session.

- Checkouts and the seconds they waited (for a free connection, or for a new one to connect)
  are counted: two clock reads per checkout. Counts start again when the pool is recreated
  (`engine.dispose()`).
- A connection the server already closed is never handed out. When a server restarts or
  terminates our backends it closes the sockets, and asyncpg marks those connections closed as
  soon as the event loop reads the EOF: checking that flag costs no round trip (unlike
  pre-ping). Every connection pooled before it is recycled too (after a restart they are all
  dead), as SQLAlchemy's own pre-ping does on a failed ping.
- A checkout waits for a free connection in slices of `WAIT_SLICE` seconds, up to
  `pool.timeout` in all, instead of in one wait: between slices it notices what no queue
  waiter hears about. Its server was ejected: a waiter in a dead server's pool would otherwise
  wait out `pool.timeout`, or connect anew to the dying server (whose dropped SYNs cost
  seconds), where giving up lets the statement be replayed on a node that is up. And a slot
  freed by a connect that failed, which wakes no waiter.
- A connection idle longer than `ping_idle_after` answers a ping within `ping_within`
  seconds, or is replaced. A connection cut without a FIN looks alive (no EOF ever comes) and
  would hang the first statement sent on it until TCP gives up, minutes later; such cuts happen
  to idle connections (NAT and firewall timeouts), so only those pay the round trip. A
  replaced connection is invalidated (SQLAlchemy terminates it after a bounded close).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import queue as sqla_queue

from pg_session_router.db.driver_errors import EjectedWhileWaitingError
from pg_session_router.db.health import ServerHealth

#: In a pooled connection's record: when it was last returned to the pool (monotonic).
_IDLE_SINCE = "pg_session_router.idle_since"
#: Seconds between two looks at the server's health while a checkout waits for a connection.
#: A wait shorter than this costs what SQLAlchemy's single wait costs.
WAIT_SLICE = 0.1


class RouterPool(AsyncAdaptedQueuePool):
    """See the module. Build a node's pool class with `configured()`: the settings live on
    the class because the pool recreates itself from its class (`engine.dispose()`)."""

    ping_idle_after: float | None = None
    ping_within: float = 5.0
    #: `pool.timeout`: the longest a checkout waits for a free connection, all slices together.
    checkout_timeout: float = 30.0
    #: The health of the node's server (None: a pool outside a router, never given up on).
    health: ServerHealth | None = None
    checkouts = 0
    checkout_wait = 0.0

    @classmethod
    def configured(
        cls,
        *,
        ping_idle_after: float | None,
        ping_within: float,
        checkout_timeout: float,
        health: ServerHealth | None,
    ) -> type[RouterPool]:
        settings = {
            "ping_idle_after": ping_idle_after,
            "ping_within": ping_within,
            "checkout_timeout": checkout_timeout,
            "health": health,
        }
        return type(cls.__name__, (cls,), settings)

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            record = self._next_record(started)
        finally:
            self.checkouts += 1
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

    def _next_record(self, started: float) -> ConnectionPoolEntry:
        # SQLAlchemy's checkout, minus its wait: an idle connection, or a new one while the
        # pool has room. Only a full pool waits, here, one slice at a time; after each slice,
        # give up if the server was ejected (before connecting anew: a dying server may drop
        # the SYN, and the kernel tries again only a second later) or the timeout is spent.
        while True:
            if not self._pool.empty() or not self._full():
                return super()._do_get()  # no wait inside: idle, or room for a new one
            try:
                record: ConnectionPoolEntry | None = self._pool.get(True, WAIT_SLICE)
            except sqla_queue.Empty:
                record = None
            health = self.health
            if health is not None and not health.up:
                if record is not None:
                    self._do_return_conn(record)
                raise EjectedWhileWaitingError(
                    "the server was ejected while waiting for a pooled connection"
                )
            if record is not None:
                return record
            if time.perf_counter() - started >= self.checkout_timeout:
                raise PoolTimeoutError(
                    f"no pooled connection came free within {self.checkout_timeout:g} s "
                    f"(pool size {self.size()}, overflow {self._max_overflow})"
                )

    def _full(self) -> bool:
        return -1 < self._max_overflow <= self._overflow

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()
        super()._do_return_conn(record)

    def _check_before_use(self, record: ConnectionPoolEntry, connection: Any) -> None:
        """Runs in the checkout's greenlet. An invalidated record is connected anew by
        SQLAlchemy before it is handed out (within the checkout, so a failure to connect
        reaches the caller's first statement, which the router may replay)."""
        driver = connection.driver_connection
        if driver is not None and driver.is_closed():
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
