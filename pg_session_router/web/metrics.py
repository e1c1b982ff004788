"""`GET /metrics`: the router's Prometheus metrics, when `http.metrics` is on.

Shown to the same requests as the health details (`http.health_token`, or
`http.health_details_public`): the metrics name nodes and servers. Not in the OpenAPI schema
(it is the operators' endpoint, not the API's); 404 when metrics are off.
"""

from __future__ import annotations

from fastapi import Request, Response

from pg_session_router.web.health import operators_only
from pg_session_router.web.installation import installation_of


async def metrics_endpoint(request: Request) -> Response:
    metrics = installation_of(request).metrics
    refusal = operators_only(request, enabled=metrics is not None)
    if refusal is not None:
        return refusal
    assert metrics is not None  # enabled
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
