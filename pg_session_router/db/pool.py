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
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

#: In a pooled connection's record: when it was last returned to the pool (monotonic).
_IDLE_SINCE = "pg_session_router.idle_since"


class RouterPool(AsyncAdaptedQueuePool):
    """See the module. Build a node's pool class with `configured()`: the settings live on
    the class because the pool recreates itself from its class (`engine.dispose()`)."""

    ping_idle_after: float | None = None
    ping_within: float = 5.0
    checkouts = 0
    checkout_wait = 0.0

    @classmethod
    def configured(cls, *, ping_idle_after: float | None, ping_within: float) -> type[RouterPool]:
        settings = {"ping_idle_after": ping_idle_after, "ping_within": ping_within}
        return type(cls.__name__, (cls,), settings)

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            record = super()._do_get()
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
