"""pg-session-router: an async session router for SQLAlchemy 2 + asyncpg (+ FastAPI).

    from pg_session_router import RouterProvider, load_settings
    from pg_session_router.web import install_router, get_db

The FastAPI face lives in `pg_session_router.web` (imported on demand, so scripts and workers
need no web framework); the test kit in `pg_session_router.testing`.
"""

from pg_session_router.core.errors import (
    CommitOutcomeUnknownError,
    ConfigError,
    ConnectionLostError,
    CrossTenantError,
    DatabaseUnavailableError,
    EventLoopMismatchError,
    InvalidConsistencyTokenError,
    InvalidTenantError,
    InvalidTokenError,
    MigrationError,
    NoNodeAvailableError,
    ReadOnlySessionError,
    RouterError,
    RouterNotInstalledError,
    TargetError,
    TenantConflictError,
    TenantError,
    TenantInactiveError,
    TenantRequiredError,
    TenantStorageMissingError,
    TopologyChangedError,
    UnknownTenantError,
)
from pg_session_router.core.settings import RouterSettings
from pg_session_router.core.validation import load_settings
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target

__all__ = [
    "CommitOutcomeUnknownError",
    "ConfigError",
    "ConnectionLostError",
    "ConsistencyToken",
    "CrossTenantError",
    "DatabaseUnavailableError",
    "EventLoopMismatchError",
    "InvalidConsistencyTokenError",
    "InvalidTenantError",
    "InvalidTokenError",
    "MigrationError",
    "NoNodeAvailableError",
    "ReadOnlySessionError",
    "RouterError",
    "RouterNotInstalledError",
    "RouterProvider",
    "RouterSettings",
    "SessionRouter",
    "Target",
    "TargetError",
    "TenantConflictError",
    "TenantError",
    "TenantInactiveError",
    "TenantRequiredError",
    "TenantStorageMissingError",
    "TopologyChangedError",
    "UnknownTenantError",
    "load_settings",
]
