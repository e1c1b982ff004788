"""The reference FastAPI application, `app.main:app`, built on `pg_session_router`.

`install_router` adds the lifespan (settings checked and servers probed at startup, pools
closed at shutdown), the middleware, the error handlers, the configured tenant resolver and
`GET /health/db`. It shares `app.db.session.provider` with scripts, so `get_db` and
`get_db_context` use one router.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.api.routes import items, reports
from app.db import session
from pg_session_router.db.provider import RouterProvider
from pg_session_router.web import install_router


def create_app(provider: RouterProvider | None = None) -> FastAPI:
    """The app; `provider` defaults to the one `app.db.session` shares with scripts."""
    app = FastAPI(title="session router example")
    install_router(app, provider=provider or session.provider)
    app.include_router(items.router)
    app.include_router(reports.router)
    return app


app = create_app()
