"""Migrate the reference app's tables everywhere: the default cluster and every tenant."""

from __future__ import annotations

from app.core.config import load_settings
from app.models import Base
from pg_session_router.db.migrate import migrate
from pg_session_router.db.router import SessionRouter


async def migrate_everything() -> list[str]:
    """What `python -m app migrate` does; returns the targets migrated."""
    router = SessionRouter.from_settings(load_settings())
    try:
        return await migrate(router, Base.metadata)
    finally:
        await router.dispose()
