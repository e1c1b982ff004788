"""`RouterProvider`: an application's router, built on first use and rebuilt per event loop.

Scripts, the FastAPI face and test kits all need "the router of this application" without
building it at import time (importing opens no connection and reads no file) and without
holding it in module globals of the library. A provider is that one slot: it reads the
settings once, builds the router when first asked, lets tests install their own, and disposes
it. asyncpg connections belong to the event loop that opened them, so a router whose loop has
closed (one event loop per test, `asyncio.run()` per script step) is replaced by a new one
with the same settings instead of failing later with "Future attached to a different loop".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pg_session_router.core.settings import RouterSettings
from pg_session_router.db.router import SessionRouter

logger = logging.getLogger(__name__)

SettingsSource = RouterSettings | Callable[[], RouterSettings]


class RouterProvider:
    def __init__(self, settings: SettingsSource | None = None) -> None:
        self._source: SettingsSource = settings if settings is not None else RouterSettings
        self._settings: RouterSettings | None = None
        self._router: SessionRouter | None = None

    @property
    def settings(self) -> RouterSettings:
        """The settings, read on first access (a bad configuration raises `ConfigError`)."""
        if self._settings is None:
            source = self._source
            self._settings = source if isinstance(source, RouterSettings) else source()
        return self._settings

    def get(self) -> SessionRouter:
        """The router; built on first use, and built anew if its event loop has closed."""
        router = self._router
        if router is None:
            router = self._router = SessionRouter.from_settings(self.settings)
        elif router.loop_closed:
            logger.warning(
                "the router's event loop has closed (its pools died with it): building a new "
                "router with the same settings"
            )
            router = self._router = SessionRouter(router.settings)
        return router

    @property
    def current(self) -> SessionRouter | None:
        """The router if one has been built or set, without building one."""
        return self._router

    def set(self, router: SessionRouter | None) -> None:
        """Install a router (tests, reconfiguration); None: build from settings on next use."""
        self._router = router

    async def dispose(self) -> None:
        """Close every pool of the current router and forget it (the next use builds anew)."""
        router, self._router = self._router, None
        if router is not None:
            await router.dispose()
