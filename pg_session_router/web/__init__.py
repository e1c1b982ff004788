"""The FastAPI face of the router: `install_router`, session dependencies, tenant resolvers.

The one layer that knows FastAPI and Starlette; everything below it (`core`, `db`) does not.
"""

from pg_session_router.web.dependencies import (
    DbSession,
    ReadSession,
    RequestSessionMaker,
    SessionMaker,
    TenantDbSession,
    TenantId,
    TenantReadSession,
    TenantSessionMaker,
    TenantWriteSession,
    WriteSession,
    get_db,
    get_read_db,
    get_sessionmaker,
    get_write_db,
    request_target,
    require_tenant,
)
from pg_session_router.web.errors import install_error_handlers
from pg_session_router.web.install import install_router
from pg_session_router.web.installation import RouterInstallation, installation_of

__all__ = [
    "DbSession",
    "ReadSession",
    "RequestSessionMaker",
    "RouterInstallation",
    "SessionMaker",
    "TenantDbSession",
    "TenantId",
    "TenantReadSession",
    "TenantSessionMaker",
    "TenantWriteSession",
    "WriteSession",
    "get_db",
    "get_read_db",
    "get_sessionmaker",
    "get_write_db",
    "install_error_handlers",
    "install_router",
    "installation_of",
    "request_target",
    "require_tenant",
]
