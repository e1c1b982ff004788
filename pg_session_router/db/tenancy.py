"""Tenants: validating ids, where each tenant lives, and the registry that knows them all.

A *placement strategy* answers, for one tenant, which cluster holds its data and what must run
at the start of each transaction to confine it: nothing for `database`; `search_path` for
`schema`; `app.tenant_id` for `row`. Both settings are transaction-local
(`set_config(..., true)`), so a pooled connection carries nothing into the next transaction.

The *registry* knows the tenants of the configuration file and, optionally, those of the
`tenants` catalog table on the default cluster's primary. The catalog is read whole (on a TTL,
and on a miss at most once per `catalog_min_reload`), never id by id: a burst of requests for
random unknown ids costs at most one query per interval, and each lookup on the hot path is a
dictionary read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    TextClause,
    func,
    select,
    text,
    true,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from pg_session_router.core.errors import (
    DatabaseUnavailableError,
    InvalidTenantError,
    TenantInactiveError,
    UnknownTenantError,
)
from pg_session_router.core.names import default_schema_name, quote_identifier, validate_tenant_id
from pg_session_router.core.settings import TenancySettings, TenantSettings
from pg_session_router.db.driver_errors import describe_error, sqlstate
from pg_session_router.db.keys import ClusterKey

logger = logging.getLogger(__name__)

TransactionSetup = tuple[TextClause, dict[str, Any]]

# Built once: compiled-statement caching keys on this object.
_SET_CONFIG = text("SELECT set_config(:name, :value, true)")
ROW_TENANT_SETTING = "app.tenant_id"
#: The row tenant of the current transaction (NULL without one): the column default of
#: `tenant_id` columns and both sides of the row-level-security policy.
CURRENT_ROW_TENANT_SQL = f"NULLIF(current_setting('{ROW_TENANT_SETTING}', true), '')"


def current_row_tenant() -> TextClause:
    """`server_default` for a model's `tenant_id` column: rows are stamped by the database."""
    return text(CURRENT_ROW_TENANT_SQL)


_UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tenant lives: the cluster key and the per-transaction setup, if any."""

    tenant_id: str
    settings: TenantSettings
    cluster_key: ClusterKey
    transaction_setup: TransactionSetup | None
    #: `schema`: the schema holding the tenant's tables. `database`: the database name.
    schema: str | None = None
    database: str | None = None

    @property
    def strategy(self) -> str:
        return self.settings.strategy

    @property
    def active(self) -> bool:
        return self.settings.active


class DatabaseStrategy:
    """The tenant's own database: on a shared cluster's servers (and so its replicas), on a
    cluster of its own, or on a server of its own given by `url` (primary only)."""

    name: ClassVar[str] = "database"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        database: str | None
        if settings.url is not None:
            key, database = ClusterKey.own_server(tenant_id), settings.url.database
        elif settings.database is not None:
            cluster = settings.cluster or default_cluster
            key = ClusterKey.tenant_database(cluster, settings.database)
            database = settings.database
        else:
            assert settings.cluster is not None
            key, database = ClusterKey.configured(settings.cluster), None
        return Placement(tenant_id, settings, key, None, database=database)


class SchemaStrategy:
    """A schema in a shared database; every transaction starts with its `search_path`."""

    name: ClassVar[str] = "schema"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        schema = settings.schema_name or default_schema_name(tenant_id)
        setup = (_SET_CONFIG, {"name": "search_path", "value": quote_identifier(schema)})
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup, schema=schema)


class RowStrategy:
    """Shared tables; every transaction sets `app.tenant_id`, which row-level security reads."""

    name: ClassVar[str] = "row"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        setup = (_SET_CONFIG, {"name": ROW_TENANT_SETTING, "value": tenant_id})
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup)


STRATEGIES: dict[str, DatabaseStrategy | SchemaStrategy | RowStrategy] = {
    strategy.name: strategy for strategy in (DatabaseStrategy(), SchemaStrategy(), RowStrategy())
}


def place(tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
    return STRATEGIES[settings.strategy].place(tenant_id, settings, default_cluster)


# -- the catalog table -----------------------------------------------------------------------

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

_SETTING_COLUMNS = ("strategy", "cluster", "url", "database", "schema", "active")


class TenantCatalog:
    """Reads the whole `tenants` table; writes go through `pg_session_router.db.provisioning`."""

    def __init__(self, engine: Callable[[], AsyncEngine]) -> None:
        self._engine = engine
        #: Catalog queries made (each reads the whole table).
        self.loads = 0

    async def load(self) -> dict[str, TenantSettings]:
        self.loads += 1
        async with self._engine().connect() as connection:
            rows = (await connection.execute(select(tenants_table))).mappings().all()
        tenants = {}
        for row in rows:
            try:
                validate_tenant_id(row["id"])
                values = {key: row[key] for key in _SETTING_COLUMNS if row[key] is not None}
                tenants[row["id"]] = TenantSettings.model_validate(values)
            except (InvalidTenantError, ValidationError):
                # One bad row must not take every tenant down; it is simply not routable.
                logger.warning("catalog row for a tenant is invalid and is ignored")
        return tenants


# -- the registry ----------------------------------------------------------------------------


class TenantRegistry:
    """Tenant id -> `Placement`: configured tenants, then the catalog's."""

    def __init__(
        self,
        configured: Mapping[str, TenantSettings],
        default_cluster: str,
        *,
        settings: TenancySettings,
        catalog: TenantCatalog | None = None,
    ) -> None:
        self.default_cluster = default_cluster
        self.settings = settings
        self.catalog = catalog
        self._configured = {
            tenant_id: place(tenant_id, tenant, default_cluster)
            for tenant_id, tenant in configured.items()
        }
        self._catalogued: dict[str, Placement] = {}
        self._loaded_at = float("-inf")
        self._load_failed = False
        self._warned_missing = False
        self._reload: asyncio.Task[None] | None = None

    # -- lookups ---------------------------------------------------------------------------

    def cached(self, tenant_id: str) -> Placement | None:
        """The hot path: a dictionary read. Raises for a known but disabled tenant."""
        placement = self._configured.get(tenant_id) or self._catalogued.get(tenant_id)
        if placement is None:
            return None
        if not placement.active:
            raise TenantInactiveError(f"tenant {tenant_id!r} is disabled")
        if (
            self.catalog is not None
            and time.monotonic() - self._loaded_at > self.settings.catalog_ttl
        ):
            # Refresh in the background and keep serving what we know (without a running loop,
            # the next resolve() reloads).
            with contextlib.suppress(RuntimeError):
                self._start_reload()
        return placement

    def placement(self, tenant_id: str) -> Placement:
        """Synchronous lookup of what is already known (no catalog query)."""
        placement = self.cached(tenant_id)
        if placement is None:
            validate_tenant_id(tenant_id)
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
        return placement

    async def resolve(self, tenant_id: str) -> Placement:
        """Known tenants at once; an unknown id may trigger one (shared) catalog reload."""
        placement = self.cached(tenant_id)
        if placement is not None:
            return placement
        validate_tenant_id(tenant_id)
        if self.catalog is not None and (
            time.monotonic() - self._loaded_at >= self.settings.catalog_min_reload
        ):
            await self.reload()
            placement = self.cached(tenant_id)
            if placement is not None:
                return placement
        if self._load_failed:
            raise DatabaseUnavailableError(
                f"tenant {tenant_id!r} is not known here and the tenant catalog is unreachable"
            )
        raise UnknownTenantError(f"unknown tenant {tenant_id!r}")

    def settings_of(self, tenant_id: str) -> TenantSettings:
        return (self._configured.get(tenant_id) or self._catalogued[tenant_id]).settings

    def __iter__(self) -> Iterator[Placement]:
        yield from self._configured.values()
        yield from (p for t, p in self._catalogued.items() if t not in self._configured)

    def __len__(self) -> int:
        return len(self._configured.keys() | self._catalogued.keys())

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._configured or tenant_id in self._catalogued

    # -- catalog ---------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the catalog; concurrent callers share one query (single flight)."""
        # Shielded: one caller's cancellation must not cancel the reload the others wait on.
        await asyncio.shield(self._start_reload())

    def _start_reload(self) -> asyncio.Task[None]:
        """The reload in flight, or a new one (needs a running loop)."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(
                self._load(), name="tenant-catalog-reload"
            )
        return self._reload

    async def _load(self) -> None:
        assert self.catalog is not None
        self._loaded_at = time.monotonic()  # also rate-limits retries after a failure
        try:
            tenants = await self.catalog.load()
        except Exception as exc:  # the primary may be down, or the table not created yet
            if sqlstate(exc) == _UNDEFINED_TABLE:
                if not self._warned_missing:
                    logger.warning("no tenant catalog table yet: run `python -m app migrate`")
                    self._warned_missing = True
                tenants = {}
            else:
                if not self._load_failed:
                    logger.warning("tenant catalog unavailable: %s", describe_error(exc))
                self._load_failed = True
                return
        self._load_failed = False
        self._catalogued = {
            tenant_id: place(tenant_id, tenant, self.default_cluster)
            for tenant_id, tenant in tenants.items()
        }

    def remember(self, tenant_id: str, tenant: TenantSettings) -> Placement:
        """Make a tenant routable in this process at once (after adding it to the catalog)."""
        placement = self._catalogued[tenant_id] = place(tenant_id, tenant, self.default_cluster)
        return placement

    def forget(self, tenant_id: str) -> None:
        self._catalogued.pop(tenant_id, None)

    async def close(self) -> None:
        task, self._reload = self._reload, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
