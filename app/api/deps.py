"""Annotated dependencies for routes: sessions by intent, and the request's tenant.

    async def handler(db: ReadSession, tenant: TenantId): ...

`DbSession` picks the intent from the HTTP method (GET/HEAD/OPTIONS read); `ReadSession` and
`WriteSession` declare it. The tenant comes from the app's resolver (`X-Tenant-ID` by
default). Routes that need one use the `Tenant...Session` aliases (400 when the request names
none, before any session is opened), or `Depends(require_tenant)` when they need the id itself.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.session import (
    read_session,
    required_tenant_of,
    session_by_method,
    tenant_read_session,
    tenant_session_by_method,
    tenant_write_session,
    write_session,
)

# Straight to the function-scoped generators: one dependency to solve per request, where
# `Depends(get_db)` costs two (the wrapper that spares users the `scope` argument).
DbSession = Annotated[AsyncSession, Depends(session_by_method, scope="function")]
ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]
WriteSession = Annotated[AsyncSession, Depends(write_session, scope="function")]
# The same, for routes that need a tenant: 400 (TenantRequiredError) when the request has none.
TenantDbSession = Annotated[AsyncSession, Depends(tenant_session_by_method, scope="function")]
TenantReadSession = Annotated[AsyncSession, Depends(tenant_read_session, scope="function")]
TenantWriteSession = Annotated[AsyncSession, Depends(tenant_write_session, scope="function")]


async def require_tenant(request: Request) -> str:
    # async: FastAPI would otherwise run this one-liner in a worker thread.
    return required_tenant_of(request)


TenantId = Annotated[str, Depends(require_tenant)]
