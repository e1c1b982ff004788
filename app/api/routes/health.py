"""`GET /health/db`: the library's health route (`pg_session_router.web.health`)."""

from pg_session_router.web.health import health_router as router

__all__ = ["router"]
