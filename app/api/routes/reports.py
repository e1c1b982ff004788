"""A read-only, tenant-scoped report written in raw SQL.

It shows that tenant confinement does not depend on the ORM: `text()` SQL runs inside the same
per-transaction setup (search_path or row-level security) or the tenant's own database.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import text

from pg_session_router.web import TenantReadSession
from pg_session_router.web.errors import TENANT_ROUTE_RESPONSES

router = APIRouter(prefix="/reports", tags=["reports"], responses=TENANT_ROUTE_RESPONSES)

_ITEMS = text("SELECT id, name FROM items ORDER BY id DESC LIMIT :limit")
_COUNT = text("SELECT count(*) FROM items")


@router.get("/items")
async def item_report(
    db: TenantReadSession, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    rows = (await db.execute(_ITEMS, {"limit": limit})).mappings().all()
    total = await db.scalar(_COUNT)
    return {"total": total, "latest": [dict(row) for row in rows]}
