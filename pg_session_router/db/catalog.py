"""The `tenants` catalog table on the default cluster's primary, and reading it safely.

The catalog is read whole, never id by id. Every row goes through the same validation as a
tenant of the configuration file (`TenantSettings`, `check_tenant`) and the storage-ownership
rules (`core.storage`); a row that fails any of them is logged and skipped, never routable, and
never stops the rows after it. Row-level security hides the table from every transaction that
has a tenant (`app.tenant_id` set), so no tenant's session can read other tenants' placements.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    func,
    select,
    text,
    true,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pg_session_router.core.errors import RouterError
from pg_session_router.core.names import validate_tenant_id
from pg_session_router.core.settings import (
    DatabaseSettings,
    TenantSettings,
    format_validation_error,
)
from pg_session_router.core.storage import ClaimIndex, claim_of, cluster_claims
from pg_session_router.core.validation import check_tenant

logger = logging.getLogger(__name__)

catalog_metadata = MetaData()
tenants_table = Table(
    "tenants",
    catalog_metadata,
    Column("id", Text, primary_key=True),
    Column("strategy", Text, nullable=False),
    Column("cluster", Text),
    Column("url", Text),
    Column("database", Text),
    Column("schema", Text),
    Column("active", Boolean, nullable=False, server_default=true()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("strategy IN ('database', 'schema', 'row')", name="tenants_strategy"),
)

#: Each tenant's last commit position, for `http.consistency_memory = "shared"`
#: (`db/last_writes.py`).
last_writes_table = Table(
    "router_last_writes",
    catalog_metadata,
    Column("key", Text, primary_key=True),
    Column("stream", Text, nullable=False),
    Column("lsn", BigInteger, nullable=False),
)

#: Online moves of catalogued tenants to another cluster (`db/moves.py`), one row per tenant
#: from the start of its move until `tenants drop-moved` (or `--abort`).
tenant_moves_table = Table(
    "router_tenant_moves",
    catalog_metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("source_cluster", Text, nullable=False),
    Column("target_cluster", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("rows_copied", BigInteger),
    Column("bytes_copied", BigInteger),
    Column("write_pause_ms", BigInteger),
    CheckConstraint("state IN ('copying', 'paused', 'moved')", name="tenant_moves_state"),
)

SETTING_COLUMNS = ("strategy", "cluster", "url", "database", "schema", "active")


def tenant_of_row(row: Mapping[Any, Any]) -> TenantSettings:
    return TenantSettings.model_validate(
        {key: row[key] for key in SETTING_COLUMNS if row[key] is not None}
    )


def accepted_rows(
    database: DatabaseSettings, rows: Sequence[Mapping[Any, Any]]
) -> dict[str, TenantSettings]:
    """The rows that are valid tenants and claim storage nobody else claims (oldest first)."""
    valid: dict[str, TenantSettings] = {}
    for row in rows:
        try:
            tenant_id = validate_tenant_id(row["id"])
            if tenant_id in database.tenants:
                continue  # the configuration file is the source of truth for its tenants
            tenant = tenant_of_row(row)
            check_tenant(database, tenant_id, tenant)
        except Exception as exc:  # one bad row must not take the others down
            logger.warning("catalog row ignored: %s", _why(exc))
            continue
        valid[tenant_id] = tenant
    every = {**database.tenants, **valid}
    index = ClaimIndex(cluster_claims(database, every))
    for tenant_id, tenant in database.tenants.items():
        index.add(claim_of(database, tenant_id, tenant))
    accepted: dict[str, TenantSettings] = {}
    for tenant_id, tenant in valid.items():
        claim = claim_of(database, tenant_id, tenant)
        other = index.conflict(claim)
        if other is not None:
            logger.warning(
                "catalog row ignored: %s: its %s is already used by %s",
                tenant_id,
                claim.describe(),
                other.owner,
            )
            continue
        index.add(claim)
        accepted[tenant_id] = tenant
    return accepted


def _why(exc: Exception) -> str:
    # Name fields and rules, never the row's values (a URL may hold a password).
    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    if isinstance(exc, ValueError | RouterError):
        return str(exc).splitlines()[0]
    return type(exc).__name__


class TenantCatalog:
    """Reads the whole `tenants` table; writes go through `pg_session_router.db.provisioning`."""

    def __init__(self, engine: Callable[[], AsyncEngine], database: DatabaseSettings) -> None:
        self._engine = engine
        self._database = database
        #: Catalog queries made (each reads the whole table).
        self.loads = 0

    async def load(self) -> tuple[dict[str, TenantSettings], dict[str, str]]:
        """The accepted tenants, and the state of each move under way (tenant id -> state)."""
        self.loads += 1
        query = select(tenants_table).order_by(tenants_table.c.created_at, tenants_table.c.id)
        async with self._engine().connect() as connection:
            rows = (await connection.execute(query)).mappings().all()
            moving = await _moves(connection)
        return accepted_rows(self._database, rows), moving


async def _moves(connection: AsyncConnection) -> dict[str, str]:
    # A deployment whose catalog predates moves has no such table yet: no move under way.
    if await connection.scalar(text(f"SELECT to_regclass('{tenant_moves_table.name}')")) is None:
        return {}
    query = select(tenant_moves_table.c.tenant_id, tenant_moves_table.c.state)
    return {row.tenant_id: row.state for row in await connection.execute(query)}
