"""The public face: `engine`, `async_session_maker`, `get_db`, `get_db_context`.

    from app.db.session import get_db, get_db_context

    @app.get("/things")
    async def things(db: AsyncSession = Depends(get_db)): ...

    async with get_db_context("replica") as session: ...

Importing this module opens no connection and reads no file: the process's `SessionRouter` is
built from `Settings` on first use (the FastAPI lifespan does that at startup, so a bad
configuration fails there). `engine` and `async_session_maker` keep the seed's meaning, the
default cluster's primary; they are resolved when accessed (PEP 562), so `from ... import engine`
binds the engine of the router current at that moment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.api.tenant_resolvers import HeaderResolver
from app.core.config import Settings
from app.db.consistency import CONSISTENCY_HEADER, ConsistencyToken
from app.db.errors import TenantRequiredError
from app.db.router import SessionRouter
from app.db.targets import Intent, Target

__all__ = [
    "async_session_maker",
    "dispose_router",
    "engine",
    "get_db",
    "get_db_context",
    "get_read_db",
    "get_router",
    "get_write_db",
    "set_router",
]

# Declared for type checkers and `__all__`; the values come from `__getattr__` below.
engine: AsyncEngine
async_session_maker: async_sessionmaker[AsyncSession]

_HEADER_RESOLVER = HeaderResolver()
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _RouterSlot:
    """The process's router: the one piece of module state, built lazily and replaceable."""

    router: SessionRouter | None = None


_slot = _RouterSlot()


def get_router(settings: Settings | None = None) -> SessionRouter:
    """The process's router; built on first use from `settings` (default: `load_settings()`)."""
    router = _slot.router
    if router is None:
        router = _slot.router = SessionRouter.from_settings(settings)
    return router


def set_router(router: SessionRouter | None) -> None:
    """Install a router (tests, reconfiguration); None means rebuild from settings on next use."""
    _slot.router = router


async def dispose_router() -> None:
    """Close every pool of the current router and forget it."""
    router, _slot.router = _slot.router, None
    if router is not None:
        await router.dispose()


def get_db_context(
    target: Target | str | None = None, *, tenant: str | None = None, read_only: bool = False
) -> AbstractAsyncContextManager[AsyncSession]:
    """A session for scripts and background work: commits on success, rolls back on error.

    `target` is None (default cluster's primary), "primary", "replica", "<cluster>:replica",
    a node name such as "main.replica1", or a `Target`.
    """
    return get_router().session(target, tenant=tenant, read_only=read_only)


def tenant_of(request: Request) -> str | None:
    """The request's tenant id (unvalidated), by the app's resolver: `X-Tenant-ID` unless the
    lifespan installed another in `app.state.tenant_resolver`."""
    resolver = getattr(request.app.state, "tenant_resolver", None) or _HEADER_RESOLVER
    tenant: str | None = resolver(request)
    return tenant


def required_tenant_of(request: Request) -> str:
    """The request's tenant id, or 400 (`TenantRequiredError`) when it names none."""
    tenant = tenant_of(request)
    if tenant is None:
        raise TenantRequiredError("this route needs a tenant (for example an X-Tenant-ID header)")
    return tenant


def request_target(
    request: Request, intent: Intent | None = None, *, tenant_required: bool = False
) -> Target:
    """Tenant from the request (if any); intent declared, else by HTTP method."""
    if intent is None:
        intent = "read" if request.method in _SAFE_METHODS else "write"
    tenant = required_tenant_of(request) if tenant_required else tenant_of(request)
    token = request.headers.get(CONSISTENCY_HEADER)
    after = ConsistencyToken.parse(token) if token is not None and intent == "read" else None
    return Target(tenant=tenant, intent=intent, after=after)


# FastAPI runs the exit of a yield dependency after the response has been sent unless the
# dependency is function-scoped. The commit must happen before: a 2xx must mean "committed".
# So the generators below are used function-scoped, and the public `get_db` is a plain function
# over one, which lets users keep writing `Depends(get_db)` without knowing about scopes.


def _session_dependency(
    intent: Intent | None, *, tenant_required: bool
) -> Callable[[Request], AsyncIterator[AsyncSession]]:
    async def session_for_request(request: Request) -> AsyncIterator[AsyncSession]:
        target = request_target(request, intent, tenant_required=tenant_required)
        tokens = not target.read_only and getattr(request.app.state, "consistency_tokens", False)
        async with get_router().session(target, consistency_token=tokens) as session:
            yield session
        # Committed (an error would have left the block by now): hand the token on to the
        # middleware that puts it on the response.
        token = session.info.get("consistency_token")
        if token is not None:
            request.state.consistency_token = str(token)

    return session_for_request


session_by_method = _session_dependency(None, tenant_required=False)
read_session = _session_dependency("read", tenant_required=False)
write_session = _session_dependency("write", tenant_required=False)
tenant_session_by_method = _session_dependency(None, tenant_required=True)
tenant_read_session = _session_dependency("read", tenant_required=True)
tenant_write_session = _session_dependency("write", tenant_required=True)


async def get_db(
    session: Annotated[AsyncSession, Depends(session_by_method, scope="function")],
) -> AsyncSession:
    """FastAPI dependency: a session for this request (GET/HEAD/OPTIONS read, others write)."""
    return session


async def get_read_db(
    session: Annotated[AsyncSession, Depends(read_session, scope="function")],
) -> AsyncSession:
    """FastAPI dependency: a read session (a replica, else the primary READ ONLY)."""
    return session


async def get_write_db(
    session: Annotated[AsyncSession, Depends(write_session, scope="function")],
) -> AsyncSession:
    """FastAPI dependency: a session on the primary."""
    return session


def __getattr__(name: str) -> Any:
    if name == "engine":
        return get_router().default_cluster.primary.engine
    if name == "async_session_maker":
        return get_router().default_cluster.primary.session_factory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
