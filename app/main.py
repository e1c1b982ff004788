"""The example FastAPI application, `app.main:app`.

The lifespan builds the router at startup (so a bad configuration fails there, not at the first
request) and disposes every engine at shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.consistency import ConsistencyTokenMiddleware
from app.api.errors import install_error_handlers
from app.api.routes import health, items, reports
from app.api.tenant_resolvers import build_tenant_resolver
from app.core.config import load_settings
from app.db.session import dispose_router, get_router


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Settings are read here, at startup: a bad configuration fails now, naming the key.
    settings = load_settings()
    app.state.tenant_resolver = build_tenant_resolver(settings.http)
    app.state.consistency_tokens = settings.http.consistency_tokens
    await get_router(settings).start()
    try:
        yield
    finally:
        await dispose_router()


def create_app() -> FastAPI:
    app = FastAPI(title="session router example", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(ConsistencyTokenMiddleware)
    app.include_router(items.router)
    app.include_router(reports.router)
    app.include_router(health.router)
    return app


app = create_app()
