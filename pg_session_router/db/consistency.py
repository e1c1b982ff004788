"""Read-your-writes by WAL position: consistency tokens.

After a write commits, the router reads the primary's WAL insert position; that position, and
the WAL stream it belongs to, make a token (`<stream>/<lsn>`). A read that presents the token is
served only by a replica whose replayed position (as last probed by the health monitor) is at
least that far, else by the primary in a READ ONLY transaction: never by a replica that could
still miss the write, and without guessing a time window. Reads cost no extra round trip; a
write that asks for a token costs one query after its COMMIT, on the same connection before it
goes back to the pool.

The stream is the server cluster, not the tenant: databases on one server share its WAL, so a
tenant database on cluster `main` has stream `main`; a tenant with a server of its own
(`@tenant`) has its own (`ClusterKey.stream`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from pg_session_router.core.errors import ConnectionLostError, InvalidConsistencyTokenError

#: A position after the COMMIT, not before it: a replica that has replayed this far has
#: replayed the commit record too.
WAL_POSITION_SQL = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint"
#: How far a replica has replayed, in the same units.
REPLAYED_POSITION = text("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint")

#: The HTTP header a token travels in: on a write's response, and back on later reads.
CONSISTENCY_HEADER = "x-consistency-token"
#: The cookie it travels in when `http.consistency_cookie` is on.
CONSISTENCY_COOKIE = "pgrouter-consistency"

#: WAL positions are 64-bit; PostgreSQL's own int8 (and OTLP's) cannot hold more.
_MAX_LSN = 2**63 - 1
_TOKEN = re.compile(r"^(?P<stream>[a-z0-9_@-]{1,130})/(?P<lsn>[0-9]{1,20})$")


@dataclass(frozen=True, slots=True)
class ConsistencyToken:
    stream: str
    lsn: int

    def __str__(self) -> str:
        return f"{self.stream}/{self.lsn}"

    @classmethod
    def parse(cls, value: str) -> ConsistencyToken:
        match = _TOKEN.fullmatch(value)
        if match is None or int(match["lsn"]) > _MAX_LSN:
            raise InvalidConsistencyTokenError(
                "malformed consistency token: send back the X-Consistency-Token of a write"
            )
        return cls(match["stream"], int(match["lsn"]))


def token_of(session: Any) -> ConsistencyToken | None:
    """The consistency token of a committed unit of work opened with
    `consistency_token=True` (None otherwise): hand it to background work, which reads with
    `after=token` and sees the write."""
    token = session.info.get("consistency_token")
    return token if isinstance(token, ConsistencyToken) else None


def read_wal_position(connection: Connection) -> int:
    """The server's current WAL position, read on `connection` outside any transaction.

    The one place a WAL position is read: after a COMMIT (the consistency token), for
    `router.consistency_token()`, and by `add_tenant` before it waits for replicas. It goes
    straight to the asyncpg connection (no BEGIN, no statement compilation: one round trip), so
    it must run in SQLAlchemy's greenlet: inside `run_sync()` or a session event listener.
    """
    adapted = connection.connection.dbapi_connection
    if adapted is None:  # the connection was invalidated meanwhile
        raise ConnectionLostError("the connection closed before the WAL position was read")
    return int(adapted.run_async(lambda driver: driver.fetchval(WAL_POSITION_SQL)))


class LastWrites:
    """The last commit position of each key (a tenant id, "" for none), newest first out of
    a bounded LRU: the memory of `http.consistency_memory`. Not thread-safe; one per app."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._tokens: OrderedDict[str, ConsistencyToken] = OrderedDict()

    def record(self, key: str, token: ConsistencyToken) -> None:
        known = self._tokens.get(key)
        if known is None or known.stream != token.stream or known.lsn < token.lsn:
            self._tokens[key] = token
        self._tokens.move_to_end(key)
        if len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)

    def get(self, key: str) -> ConsistencyToken | None:
        return self._tokens.get(key)

    # The face both memories show the web layer (`SharedLastWrites` needs to await).
    async def recall(self, key: str) -> ConsistencyToken | None:
        return self._tokens.get(key)

    async def remember(self, key: str, token: ConsistencyToken) -> None:
        self.record(key, token)

    def __len__(self) -> int:
        return len(self._tokens)
