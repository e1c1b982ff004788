"""ASGI middleware: puts the router installation in each request's scope, and a write's
consistency token on its response.

The session dependency computes the token after the COMMIT, which FastAPI runs after the route
returned but before the response is sent; this middleware adds it as `X-Consistency-Token` when
the response starts. Pure ASGI (no BaseHTTPMiddleware): no extra task, no body buffering.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pg_session_router.db.consistency import CONSISTENCY_HEADER
from pg_session_router.web.installation import STATE_KEY, RouterInstallation

_HEADER = CONSISTENCY_HEADER.encode()
#: Where the session dependency leaves the token for the response (`request.state`).
TOKEN_STATE_KEY = "consistency_token"  # noqa: S105 - a key name, not a secret


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

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start":
                token = state.get(TOKEN_STATE_KEY)
                if token is not None:
                    message["headers"] = [*message.get("headers", []), (_HEADER, token.encode())]
            await send(message)

        await self.app(scope, receive, send_with_token)
