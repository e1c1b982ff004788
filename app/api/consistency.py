"""ASGI middleware that puts a write's consistency token on its response.

The session dependency computes the token after the COMMIT, which FastAPI runs after the route
returned but before the response is sent; this middleware adds it as `X-Consistency-Token` when
the response starts. Pure ASGI (no BaseHTTPMiddleware): no extra task, no body buffering.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db.consistency import CONSISTENCY_HEADER

_HEADER = CONSISTENCY_HEADER.encode()


class ConsistencyTokenMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_token(message: Message) -> None:
            if message["type"] == "http.response.start":
                token = scope.get("state", {}).get("consistency_token")
                if token is not None:
                    message["headers"] = [*message.get("headers", []), (_HEADER, token.encode())]
            await send(message)

        await self.app(scope, receive, send_with_token)
