"""`install_router(app)`: everything a FastAPI app needs from the router, in one call.

It wraps the app's lifespan (settings checked and every server probed at startup, every pool
closed at shutdown, around the app's own lifespan), adds the middleware that hands the router to
the session dependencies and puts consistency tokens on write responses, installs the error
handlers (each router error its HTTP status, never a bare 500), builds the tenant resolver
that `http.*` names, and adds the routes: `GET /health/db` (in the app's OpenAPI), and
`/metrics`, `/status` and the admin routes (404 until their settings turn them on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Match

from pg_session_router.core.errors import ConfigError
from pg_session_router.db.provider import RouterProvider, SettingsSource
from pg_session_router.web.admin import drain_node, undrain_node
from pg_session_router.web.errors import install_error_handlers
from pg_session_router.web.health import health_router
from pg_session_router.web.installation import STATE_KEY, RouterInstallation
from pg_session_router.web.metrics import metrics_endpoint
from pg_session_router.web.middleware import RouterMiddleware
from pg_session_router.web.resolvers import TenantResolver
from pg_session_router.web.status_page import status_page


def install_router(
    app: FastAPI,
    settings: SettingsSource | None = None,
    *,
    provider: RouterProvider | None = None,
    tenant_resolver: TenantResolver | None = None,
    health_route: bool = True,
) -> RouterInstallation:
    """Wire the router into `app`. Give `settings` (a `RouterSettings`, or a function that
    loads them at startup), or a `provider` shared with scripts; not both.

    `tenant_resolver`: your own `(request) -> tenant id | None`, for tenants that come from your
    authentication; it replaces the one `http.tenant_resolver` names. `health_route=False`:
    no `GET /health/db` (also left out when the app already has one)."""
    if settings is not None and provider is not None:
        raise ConfigError("install_router: give settings or a provider, not both")
    if isinstance(getattr(app.state, STATE_KEY, None), RouterInstallation):
        raise ConfigError("install_router: a router is already installed on this app")
    installation = RouterInstallation(provider or RouterProvider(settings), tenant_resolver)
    setattr(app.state, STATE_KEY, installation)
    app.add_middleware(RouterMiddleware, installation=installation)
    if health_route and not _has_route(app, "/health/db"):
        app.include_router(health_router)  # for load balancers: details only for operators
    # Always routed, 404 unless `http.metrics` (settings are read at startup, routes now).
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_api_route("/status", status_page, methods=["GET"], include_in_schema=False)
    # 404 unless `http.admin_token`.
    app.add_api_route(
        "/admin/nodes/{node}/drain", drain_node, methods=["POST"], include_in_schema=False
    )
    app.add_api_route(
        "/admin/nodes/{node}/undrain", undrain_node, methods=["POST"], include_in_schema=False
    )
    install_error_handlers(app)
    _wrap_lifespan(app, installation)
    return installation


def _has_route(app: FastAPI, path: str) -> bool:
    """A GET of `path` is served already (routes of included routers too: asked by matching,
    since FastAPI keeps an included router as one entry)."""
    scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def _wrap_lifespan(app: FastAPI, installation: RouterInstallation) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(asgi_app: Any) -> AsyncIterator[Any]:
        # The router starts before the app's own startup code (which may use it) and is
        # disposed after its shutdown code.
        await installation.start()
        try:
            async with inner(asgi_app) as state:
                yield state
        finally:
            await installation.stop()

    app.router.lifespan_context = lifespan
