"""The public face: `engine`, `async_session_maker`, `get_db`, `get_db_context`.

    from app.db.session import get_db, get_db_context

    @app.get("/things")
    async def things(db: AsyncSession = Depends(get_db)): ...

    async with get_db_context("replica") as session: ...

Built on the `pg_session_router` library: `provider` is this application's router, read from
the app's settings (`app.core.config`) on first use (the app's lifespan does that at startup,
so a bad configuration fails there); importing this module opens no connection and reads no
file. `get_db` is the library's dependency; `app.main` installs the router with this provider,
so requests and scripts share one router. `engine` and `async_session_maker` keep the seed's
meaning, the default cluster's primary; they are resolved when accessed (PEP 562), so
`from ... import engine` binds the engine of the router current at that moment.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.core.config import load_settings
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.db.unit_of_work import UnitOfWork
from pg_session_router.web.dependencies import get_db

__all__ = [
    "async_session_maker",
    "dispose_router",
    "engine",
    "get_db",
    "get_db_context",
    "get_router",
    "provider",
    "set_router",
]

# Declared for type checkers and `__all__`; the values come from `__getattr__` below.
engine: AsyncEngine
async_session_maker: async_sessionmaker[AsyncSession]

#: This application's router slot: the one piece of module state (the seed's contract is a
#: module-level `get_db_context`, so something module-level must know the router).
provider = RouterProvider(load_settings)


def get_router() -> SessionRouter:
    """The application's router; built on first use from the app's settings."""
    return provider.get()


def set_router(router: SessionRouter | None) -> None:
    """Install a router (tests, reconfiguration); None means rebuild from settings on next use."""
    provider.set(router)


async def dispose_router() -> None:
    """Close every pool of the current router and forget it."""
    await provider.dispose()


def get_db_context(
    target: Target | str | None = None,
    *,
    tenant: str | None = None,
    read_only: bool = False,
    after: ConsistencyToken | str | None = None,
) -> UnitOfWork:
    """A session for scripts and background work: commits on success, rolls back on error.

    `target` is None (default cluster's primary), "primary", "replica", "<cluster>:replica",
    a node name such as "main.replica1", or a `Target`. `after`: a consistency token (see
    `token_of`) the read must see: a job reads what the request that enqueued it wrote.
    """
    return provider.get().session(target, tenant=tenant, read_only=read_only, after=after)


def __getattr__(name: str) -> Any:
    if name == "engine":
        return provider.get().default_cluster.primary.engine
    if name == "async_session_maker":
        return provider.get().default_cluster.primary.session_factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
