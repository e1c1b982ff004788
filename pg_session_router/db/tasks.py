"""The router's background work (the health monitor, the catalog listener): tasks started
in a context of their own and stopped by cancelling and waiting, and the direct connections
they hold outside every pool."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from pg_session_router.db.sockets import set_tcp_options, tcp_options


def start_background(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A fresh context: a task started from a request must not carry that request's log
    fields or trace context into every line it logs later."""
    return asyncio.create_task(work, name=name, context=contextvars.Context())


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def connect_direct(
    url: URL,
    *,
    connect_timeout: float,
    application_name: str,
    password: Callable[[], Awaitable[str]] | None = None,
    dead_after: float | None = None,
) -> Any:
    """An asyncpg connection of the router's own to `url`'s server (credentials from the URL,
    or from `password`, a provider; never logged), named so that operators and tests can tell
    it from pooled ones. `dead_after`: dropped by the kernel once its server has been silent
    that long (`sockets.tcp_options`)."""
    connection = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=password or url.password,
        database=url.database,
        timeout=connect_timeout,
        server_settings={"application_name": application_name},
    )
    if dead_after is not None:
        set_tcp_options(connection, tcp_options(dead_after))
    return connection
