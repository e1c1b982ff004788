"""FastAPI dependencies: a routed session per request, and the request's tenant.

    async def handler(db: AsyncSession = Depends(get_db)): ...   # the one-line contract
    async def handler(db: ReadSession): ...                      # intent declared
    async def handler(maker: SessionMaker):                      # SQLAlchemy's own idioms
        async with maker.begin() as session: ...

`get_db` / `DbSession` pick the intent from the HTTP method (GET/HEAD/OPTIONS read, others
write); `ReadSession` and `WriteSession` declare it; the `Tenant...` aliases answer 400 when the
request names no tenant. The tenant comes from the resolver `install_router` configured
(`X-Tenant-ID` by default) and is validated by the registry, whatever the resolver.

A 2xx response to a write means the transaction committed. FastAPI runs the code after a
dependency's `yield` *after* sending the response, unless the dependency is function-scoped;
so the generators below are used function-scoped, and `get_db` is a plain function over one,
which lets users keep writing `Depends(get_db)` without knowing about scopes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from pg_session_router.core.errors import InvalidConsistencyTokenError, TenantRequiredError
from pg_session_router.db.consistency import (
    CONSISTENCY_COOKIE,
    CONSISTENCY_HEADER,
    ConsistencyToken,
    token_of,
)
from pg_session_router.db.routed_session import RoutedSession
from pg_session_router.db.targets import Intent, Target
from pg_session_router.db.unit_of_work import UnitOfWork
from pg_session_router.web.installation import RouterInstallation, installation_of
from pg_session_router.web.middleware import ROUTE_STATE_KEY, TOKEN_STATE_KEY

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def tenant_of(request: Request) -> str | None:
    """The request's tenant id (unvalidated), by the installed resolver."""
    tenant: str | None = installation_of(request).tenant_resolver(request)
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
    """Tenant from the request (if any); intent declared, else by HTTP method; a read with a
    consistency token reads at least that fresh."""
    if intent is None:
        intent = "read" if request.method in _SAFE_METHODS else "write"
    tenant = required_tenant_of(request) if tenant_required else tenant_of(request)
    after = read_token(request) if intent == "read" else None
    return Target(tenant=tenant, intent=intent, after=after)


def read_token(request: Request) -> ConsistencyToken | None:
    """The token a read brings: the header's (a malformed one is a 400), else, with
    `http.consistency_cookie`, the cookie's (a malformed one is ignored: a browser cannot fix
    it)."""
    header = request.headers.get(CONSISTENCY_HEADER)
    if header is not None:
        return ConsistencyToken.parse(header)
    if installation_of(request).http.consistency_cookie:
        cookie = request.cookies.get(CONSISTENCY_COOKIE)
        if cookie is not None:
            with contextlib.suppress(InvalidConsistencyTokenError):
                return ConsistencyToken.parse(cookie)
    return None


async def _target(
    request: Request,
    installation: RouterInstallation,
    intent: Intent | None,
    *,
    tenant_required: bool,
) -> Target:
    """`request_target`; a read that brings no token reads at least as fresh as its tenant's
    last write when `http.consistency_memory` remembers it."""
    target = request_target(request, intent, tenant_required=tenant_required)
    memory = installation.memory
    if memory is None or not target.read_only or target.after is not None:
        return target
    after = await memory.recall(target.tenant or "")
    return replace(target, after=after) if after is not None else target


async def _after_unit(
    request: Request, installation: RouterInstallation, session: AsyncSession
) -> None:
    """The unit of work ended well (a write committed): its token to the response and to
    the memory, and the route when it is asked for."""
    token = token_of(session)
    routed: RoutedSession = session.sync_session  # type: ignore[assignment]
    if token is not None:
        setattr(request.state, TOKEN_STATE_KEY, str(token))
        if installation.memory is not None:
            # The tenant the router validated and served, not the raw resolver output.
            await installation.memory.remember(routed.tenant_id or "", token)
    if installation.http.route_header:
        route = routed.route
        setattr(request.state, ROUTE_STATE_KEY, f"{route.node.name}; reason={route.reason}")


def _session_dependency(
    intent: Intent | None, *, tenant_required: bool
) -> Callable[[Request], AsyncIterator[AsyncSession]]:
    async def session_for_request(request: Request) -> AsyncIterator[AsyncSession]:
        installation = installation_of(request)
        target = await _target(request, installation, intent, tenant_required=tenant_required)
        tokens = not target.read_only and installation.http.consistency_tokens
        async with installation.router.session(target, consistency_token=tokens) as session:
            yield session
        await _after_unit(request, installation, session)

    return session_for_request


session_by_method = _session_dependency(None, tenant_required=False)
read_session = _session_dependency("read", tenant_required=False)
write_session = _session_dependency("write", tenant_required=False)
tenant_session_by_method = _session_dependency(None, tenant_required=True)
tenant_read_session = _session_dependency("read", tenant_required=True)
tenant_write_session = _session_dependency("write", tenant_required=True)

# Straight to the function-scoped generators: one dependency to solve per request, where
# `Depends(get_db)` costs two (the wrapper that spares users the `scope` argument).
DbSession = Annotated[AsyncSession, Depends(session_by_method, scope="function")]
ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
WriteSession = Annotated[AsyncSession, Depends(write_session, scope="function")]
TenantDbSession = Annotated[AsyncSession, Depends(tenant_session_by_method, scope="function")]
TenantReadSession = Annotated[AsyncSession, Depends(tenant_read_session, scope="function")]
TenantWriteSession = Annotated[AsyncSession, Depends(tenant_write_session, scope="function")]


async def get_db(session: DbSession) -> AsyncSession:
    """A session for this request (GET/HEAD/OPTIONS read, others write)."""
    return session


async def get_read_db(session: ReadSession) -> AsyncSession:
    """A read session (a replica, else the primary READ ONLY)."""
    return session


async def get_write_db(session: WriteSession) -> AsyncSession:
    """A session on the primary."""
    return session


async def require_tenant(request: Request) -> str:
    # async: FastAPI would otherwise run this one-liner in a worker thread.
    return required_tenant_of(request)


TenantId = Annotated[str, Depends(require_tenant)]


class RequestSessionMaker:
    """A sessionmaker routed for one request, for code written against SQLAlchemy's idioms:

        async with maker() as session: ...; await session.commit()   # the caller commits
        async with maker.begin() as session: ...                     # commits at the end

    Each unit of work is routed like `get_db` (tenant, intent, consistency token), and a
    committed write's token reaches the response. Use it with `async with` only.
    """

    def __init__(
        self, request: Request, installation: RouterInstallation, target: Target, *, tokens: bool
    ) -> None:
        self._request = request
        self._installation = installation
        self._target = target
        self._tokens = tokens

    def __call__(self) -> _RequestUnit:
        return self._unit(commit_on_exit=False)

    def begin(self) -> _RequestUnit:
        return self._unit(commit_on_exit=True)

    def _unit(self, *, commit_on_exit: bool) -> _RequestUnit:
        unit = self._installation.router.session(
            self._target, consistency_token=self._tokens, commit_on_exit=commit_on_exit
        )
        return _RequestUnit(unit, self._request, self._installation)


class _RequestUnit:
    __slots__ = ("_installation", "_request", "_session", "_unit")

    def __init__(
        self, unit: UnitOfWork, request: Request, installation: RouterInstallation
    ) -> None:
        self._unit = unit
        self._request = request
        self._installation = installation

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._unit.__aenter__()
        return self._session

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._unit.__aexit__(*exc_info)
        if exc_info[1] is None:
            await _after_unit(self._request, self._installation, self._session)


def _sessionmaker_dependency(
    intent: Intent | None, *, tenant_required: bool
) -> Callable[[Request], Coroutine[Any, Any, RequestSessionMaker]]:
    async def sessionmaker_for_request(request: Request) -> RequestSessionMaker:
        installation = installation_of(request)
        target = await _target(request, installation, intent, tenant_required=tenant_required)
        tokens = not target.read_only and installation.http.consistency_tokens
        return RequestSessionMaker(request, installation, target, tokens=tokens)

    return sessionmaker_for_request


get_sessionmaker = _sessionmaker_dependency(None, tenant_required=False)
get_tenant_sessionmaker = _sessionmaker_dependency(None, tenant_required=True)
SessionMaker = Annotated[RequestSessionMaker, Depends(get_sessionmaker)]
TenantSessionMaker = Annotated[RequestSessionMaker, Depends(get_tenant_sessionmaker)]
