"""`GET /health/db`: is the database layer able to serve, and (for operators) why not.

Everyone gets the overall `status`: `ok` (every node up and fresh), `degraded` (some node
ejected or lagging, but the default cluster can still read and write), or `down` (the default
cluster has no writable primary), which answers 503 so that a load balancer can take this
instance out of rotation. The details (every node's role, state, lag, pool; tenancy figures)
describe the topology, so they are shown only to requests bearing `http.health_token`, or to
everyone when `http.health_details_public` is set. Server addresses are never shown.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr

from pg_session_router.core.settings import HttpSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.web.installation import installation_of

health_router = APIRouter(tags=["health"])

_DOWN = {"description": "the default cluster has no writable primary"}


@health_router.get("/health/db", responses={503: _DOWN})
async def database_health(request: Request) -> JSONResponse:
    installation = installation_of(request)
    router = installation.router
    overall = overall_status(router)
    body: dict[str, Any] = {"status": overall}
    if details_allowed(request, installation.http):
        body.update(public_status(router))
    return JSONResponse(body, status_code=503 if overall == "down" else 200)


def overall_status(router: SessionRouter) -> str:
    if router.default_cluster.writer() is None:
        return "down"
    nodes = [node for cluster in router.clusters.values() for node in cluster.nodes]
    if all(node.health.up and node.health.fresh for node in nodes):
        return "ok"
    return "degraded"


def operators_only(request: Request, enabled: bool) -> Response | None:
    """The refusal for an operators' endpoint (`/metrics`, `/status`): 404 when it is off,
    401 when the request may not see the health details; None: serve it."""
    if not enabled:
        return Response(status_code=404)
    if not details_allowed(request, installation_of(request).http):
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


def details_allowed(request: Request, http: HttpSettings) -> bool:
    if http.health_details_public:
        return True
    return bearer_matches(request, http.health_token)


def bearer_matches(request: Request, secret: SecretStr | None) -> bool:
    """`Authorization: Bearer <secret>`, compared in constant time; never with no secret."""
    if secret is None:
        return False
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    expected = secret.get_secret_value()
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), expected.encode()
    )


def public_status(router: SessionRouter) -> dict[str, Any]:
    """`router.status()` without server addresses."""
    status = router.status()
    for node in status["nodes"].values():
        node.pop("endpoint", None)
        if node.get("reason"):  # "probe failed: OSError: Connect call failed ('10.0.0.2', ..."
            node["reason"] = ": ".join(str(node["reason"]).split(": ")[:2])
    return status
