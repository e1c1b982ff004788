"""TCP options on every pooled connection: a server that stops answering is found dead.

A connection whose server vanished without closing it (a host that died, a network partition,
a NAT or firewall that dropped the mapping) looks alive: no EOF ever arrives. A statement sent
on it waits for an answer that never comes: until TCP gives up retransmitting the statement
(about 15 minutes on Linux), or for ever when the server acknowledged the statement before the
cut (asyncpg turns no keepalive on).

`dead_connection_timeout` bounds both cases in the kernel, where a slow query and a dead server
can be told apart (a client-side statement timeout cannot: both are silence):

- TCP keepalive: a connection with nothing in flight either way is probed after a third of
  the timeout, then every ninth; a live server's kernel answers at once, even while its backend
  runs a long query;
- `TCP_USER_TIMEOUT`: once anything sent (a statement, or a probe) has gone unacknowledged for
  the whole timeout, the kernel closes the connection (Linux then ignores the probe count).

asyncpg then fails the waiting statement with `ConnectionDoesNotExistError`, which the router
treats like any lost connection: a read is replayed on another node, a write's first statement
too, and a later statement of a write is a `ConnectionLostError` (503).

The server's end is the operator's to set (PostgreSQL's `tcp_keepalives_*` and
`tcp_user_timeout`, in postgresql.conf or `ALTER ROLE ... SET`): sent by the router as startup
parameters, they would make every connection fail behind a pooler the configuration does not
declare (PgBouncer refuses parameters it does not know). Without them, the backend of a client
that vanished mid-transaction keeps its locks until the server's own TCP gives up, and a
replayed statement may wait on them.

One case cuts a live connection: Linux ends zero-window probing at the user timeout too, so a
statement streaming more than the server reads (a large `executemany` while its backend waits
on a lock) for longer than the timeout loses its connection. Hence a default of 30 s.

asyncpg has no option for these: they are set on its socket right after it connects (a pool
`connect` listener, which costs nothing per checkout; `tasks.connect_direct` for the catalog
listener's long-idle LISTEN connection). A Unix-socket connection has no TCP to tune.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

#: The fraction of the timeout before the first keepalive probe (then one every ninth).
_PROBES = 3


def tcp_options(dead_after: float) -> list[tuple[int, int, int]]:
    """(level, option, value) for a connection to be dropped after `dead_after` seconds of an
    unanswered server; only the options this platform has (Linux has them all)."""
    wanted = [
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", max(1, round(dead_after / _PROBES))),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", max(1, round(dead_after / _PROBES**2))),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", _PROBES),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", max(1, round(dead_after * 1000))),
    ]
    return [
        (level, getattr(socket, name), value)
        for level, name, value in wanted
        if hasattr(socket, name)
    ]


def dead_peer_detection(dead_after: float) -> Callable[[Any, Any], None]:
    """A pool `connect` listener that sets `tcp_options(dead_after)` on each new connection."""
    options = tcp_options(dead_after)

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        set_tcp_options(dbapi_connection.driver_connection, options)

    return on_connect


def set_tcp_options(driver_connection: Any, options: list[tuple[int, int, int]]) -> None:
    """Set `options` on an asyncpg connection's socket (nothing for a Unix socket)."""
    # asyncpg keeps its transport in a private attribute; tests/test_reliability.py cuts a
    # connection off mid-statement, so a release that renames it fails there (a hang).
    transport = getattr(driver_connection, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in options:
        sock.setsockopt(level, option, value)
