"""ASGI middleware: puts the router installation in each request's scope, opens the
request's log context (its request id, echoed as `X-Request-ID`), and puts a write's
consistency token (and, when asked for, the route) on its response.

The session dependency computes the token after the COMMIT, which FastAPI runs after the route
returned but before the response is sent; this middleware adds it as `X-Consistency-Token` when
the response starts. Pure ASGI (no BaseHTTPMiddleware): no extra task, no body buffering.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pg_session_router.db.consistency import CONSISTENCY_COOKIE, CONSISTENCY_HEADER
from pg_session_router.observability.logs import request_context, request_id_from
from pg_session_router.web.installation import STATE_KEY, RouterInstallation

_HEADER = CONSISTENCY_HEADER.encode()
_REQUEST_ID = b"x-request-id"
_ROUTE = b"x-db-route"
#: Where the session dependency leaves the token for the response (`request.state`).
TOKEN_STATE_KEY = "consistency_token"  # noqa: S105 - a key name, not a secret
#: Where it leaves the route (`http.route_header`).
ROUTE_STATE_KEY = "db_route"


class RouterMiddleware:
    def __init__(self, app: ASGIApp, installation: RouterInstallation) -> None:
        self.app = app
        self.installation = installation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # Shared with mounted apps: Starlette passes the same `state` dict down.
        state = scope.setdefault("state", {})
        state[STATE_KEY] = self.installation
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = request_id_from(_header(scope, _REQUEST_ID))

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (_REQUEST_ID, request_id.encode())]
                token = state.get(TOKEN_STATE_KEY)
                if token is not None:
                    headers.append((_HEADER, token.encode()))
                    if self.installation.http.consistency_cookie:
                        secure = scope.get("scheme") == "https"
                        headers.append((b"set-cookie", _cookie(token, secure=secure)))
                route = state.get(ROUTE_STATE_KEY)
                if route is not None:
                    headers.append((_ROUTE, route.encode()))
                message["headers"] = headers
            await send(message)

        with request_context(request_id):
            await self.app(scope, receive, send_with_token)


def _cookie(token: str, *, secure: bool) -> bytes:
    # Short-lived: a token only matters until the replicas have replayed it.
    cookie = f"{CONSISTENCY_COOKIE}={token}; Path=/; Max-Age=300; HttpOnly; SameSite=Lax"
    return (cookie + ("; Secure" if secure else "")).encode()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None
