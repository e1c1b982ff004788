"""`POST /admin/nodes/{node}/drain` and `POST /admin/nodes/{node}/undrain`: planned maintenance
of one server, for operators (`python -m app drain NODE` calls them).

Only with `http.admin_token` set, and only for requests bearing it (`Authorization: Bearer`):
404 without the setting, 401 without the token. `health_details_public` does not open them:
seeing the topology and changing it are different rights. A drain acts on the process that
answers (see `db/drain.py`).
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pg_session_router.core.errors import TargetError
from pg_session_router.web.health import bearer_matches
from pg_session_router.web.installation import installation_of

#: Longest drain wait a request may ask for (seconds).
MAX_WITHIN = 600.0


def _refusal(request: Request) -> Response | None:
    token = installation_of(request).http.admin_token
    if token is None:
        return Response(status_code=404)
    if not bearer_matches(request, token):
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


async def drain_node(request: Request, node: str, within: float = 30.0) -> Response:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    if not 0 <= within <= MAX_WITHIN:
        return JSONResponse(
            {"error": "invalid_request", "detail": f"within: 0 to {MAX_WITHIN:g} seconds"},
            status_code=422,
        )
    try:
        report = await installation_of(request).router.drain(node, within=within)
    except TargetError:
        return JSONResponse({"error": "unknown_node", "detail": "no such node"}, status_code=404)
    return JSONResponse({"drained": asdict(report)})


async def undrain_node(request: Request, node: str) -> Response:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    try:
        nodes = installation_of(request).router.undrain(node)
    except TargetError:
        return JSONResponse({"error": "unknown_node", "detail": "no such node"}, status_code=404)
    return JSONResponse({"undrained": nodes})
