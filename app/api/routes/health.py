"""`GET /health/db`: what the router knows about every node.

The body is `router.status()` plus an overall `status`: `ok` (every node up and fresh),
`degraded` (some node ejected or lagging, but the default cluster can still read and write),
or `down` (the default cluster has no writable primary), which answers 503 so that a load
balancer can take this instance out of rotation.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pg_session_router.web import installation_of

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/db")
async def database_health(request: Request) -> JSONResponse:
    db_router = installation_of(request).router
    status: dict[str, Any] = db_router.status()
    nodes = status["nodes"].values()
    if db_router.default_cluster.writer() is None:
        overall = "down"
    elif all(node["state"] == "up" and node["fresh"] for node in nodes):
        overall = "ok"
    else:
        overall = "degraded"
    status["status"] = overall
    return JSONResponse(status, status_code=503 if overall == "down" else 200)
