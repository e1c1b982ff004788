"""Row tenants are served only where row-level security actually confines them.

PostgreSQL skips row-level security for superusers and roles with BYPASSRLS, and for a table's
owner unless the table has FORCE ROW LEVEL SECURITY. Either would let one row tenant read and
change every other's rows while everything looks fine. So before the first row-tenant session
on a cluster (at startup for the configured ones), the router checks the role it connects as
and every table with a `tenant_id` column on the path row tenants use, and refuses to serve row
tenants there (`ConfigError`, naming the cause) unless confinement holds.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import text

from pg_session_router.core.errors import ConfigError
from pg_session_router.db.cluster import Cluster
from pg_session_router.db.driver_errors import is_connect_failure
from pg_session_router.db.keys import ClusterKey

logger = logging.getLogger(__name__)

_CHECK = text(
    """
SELECT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user) AS bypasses,
       current_user AS role,
       ARRAY(SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid
              WHERE a.attname = 'tenant_id' AND NOT a.attisdropped
                AND c.relkind IN ('r', 'p', 'm') AND c.relpersistence <> 't'
                AND n.nspname = ANY (current_schemas(false))
                AND NOT (c.relrowsecurity AND c.relforcerowsecurity)
              ORDER BY 1) AS unconfined
"""
)


class RowSecurityGuard:
    def __init__(self) -> None:
        self._verified: set[ClusterKey] = set()

    def verified(self, key: ClusterKey) -> bool:
        return key in self._verified

    async def ensure(self, cluster: Cluster) -> None:
        """Check once per cluster, on every node (a replica's URL may name another role);
        `ConfigError` when row tenants would not be confined. A node that cannot be reached
        now is skipped: it serves nothing until it is up, and the check is then repeated
        only for a cluster not yet verified (a router restart checks again)."""
        if cluster.key in self._verified:
            return
        for node in cluster.nodes:
            try:
                async with node.engine.connect() as connection:
                    row = (await connection.execute(_CHECK)).one()
            except Exception as exc:
                if not is_connect_failure(exc):
                    raise
                logger.warning("row-level security not checked on %s: unreachable", node.name)
                continue
            _judge(cluster, row)
        self._verified.add(cluster.key)


def _judge(cluster: Cluster, row: Any) -> None:
    if row.bypasses:
        raise ConfigError(
            f"row tenants on cluster {cluster.name}: the router connects as role "
            f"{row.role!r}, a superuser or a role with BYPASSRLS, which row-level security "
            "does not confine; connect as an ordinary role"
        )
    if row.unconfined:
        raise ConfigError(
            f"row tenants on cluster {cluster.name}: {', '.join(row.unconfined)} "
            "have a tenant_id column without forced row-level security (or are materialized "
            "views, which it never applies to); run the migrations (they enable and force it)"
        )
