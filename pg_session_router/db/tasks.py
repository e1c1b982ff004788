"""The router's background tasks (the health monitor, the catalog listener): started in a
context of their own, stopped by cancelling and waiting."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Coroutine
from typing import Any


def start_background(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A fresh context: a task started from a request must not carry that request's log
    fields or trace context into every line it logs later."""
    return asyncio.create_task(work, name=name, context=contextvars.Context())


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
