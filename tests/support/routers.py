"""Routers as an app process runs them, for tests of what other processes see."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.router import SessionRouter


@asynccontextmanager
async def listening_router(settings: DatabaseSettings) -> AsyncIterator[SessionRouter]:
    """A started router (monitor and catalog listener), once its listener is subscribed."""
    router = SessionRouter(settings)
    await router.start()
    try:
        assert router.catalog_listener is not None
        await asyncio.wait_for(router.catalog_listener.listening.wait(), timeout=5)
        yield router
    finally:
        await router.dispose()
