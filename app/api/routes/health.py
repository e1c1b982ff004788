"""`GET /health/db`: what the router knows about every node."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.db.session import get_router

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/db")
async def database_health() -> dict[str, Any]:
    return get_router().status()
