"""Tenant placements: which cluster holds a tenant's data, and what confines each transaction.

A *placement strategy* answers, for one tenant, which cluster holds its data and what must run
at the start of each transaction to confine it: nothing for `database` (its own database, its
own engines); for `schema` and `row`, one statement that sets, for the transaction only
(`set_config(..., true)`, so a pooled connection carries nothing into the next transaction):
`search_path`, with `pg_temp` named last (a temporary table can never stand in for one of the
tenant's tables); `pg_session_router.tenant`, the tenant being served (the catalog's
row-level security hides every row from a transaction that has one); and for row tenants
`app.tenant_id`, which the tenant tables' row-level security reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sqlalchemy import TextClause, text

from pg_session_router.core.names import default_schema_name, quote_identifier
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db.keys import ClusterKey

TransactionSetup = tuple[TextClause, dict[str, Any]]

ROW_TENANT_SETTING = "app.tenant_id"
#: Set in every tenant transaction (schema and row tenants): the tenant being served.
SERVED_TENANT_SETTING = "pg_session_router.tenant"
#: True in a transaction that serves no tenant.
NO_TENANT_SQL = f"NULLIF(current_setting('{SERVED_TENANT_SETTING}', true), '') IS NULL"
#: The tenant of the current transaction (NULL without one): the column default of
#: `tenant_id` columns and both sides of the row-level-security policies.
CURRENT_ROW_TENANT_SQL = f"NULLIF(current_setting('{ROW_TENANT_SETTING}', true), '')"
#: Row tenants: the shared tables' schema, then the temporary one (no `"$user"`: a schema
#: named after the role could otherwise come first).
ROW_TENANT_SEARCH_PATH = "public, pg_temp"

# Built once: compiled-statement caching keys on these objects. One statement, one round trip.
_SCHEMA_SETUP = text(
    f"SELECT set_config('search_path', :path, true), "
    f"set_config('{SERVED_TENANT_SETTING}', :tenant, true)"
)
_ROW_SETUP = text(
    f"SELECT set_config('search_path', :path, true), "
    f"set_config('{SERVED_TENANT_SETTING}', :tenant, true), "
    f"set_config('{ROW_TENANT_SETTING}', :tenant, true)"
)


def current_row_tenant() -> TextClause:
    """`server_default` for a model's `tenant_id` column: rows are stamped by the database."""
    return text(CURRENT_ROW_TENANT_SQL)


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
        elif settings.cluster is not None:
            key, database = ClusterKey.configured(settings.cluster), None
        else:  # refused by TenantSettings' own validation
            raise ValueError("a database tenant needs url, database or cluster")
        return Placement(tenant_id, settings, key, None, database=database)


class SchemaStrategy:
    """A schema in a shared database; every transaction starts with its `search_path`."""

    name: ClassVar[str] = "schema"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        schema = settings.schema_name or default_schema_name(tenant_id)
        setup = (
            _SCHEMA_SETUP,
            {"path": f"{quote_identifier(schema)}, pg_temp", "tenant": tenant_id},
        )
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup, schema=schema)


class RowStrategy:
    """Shared tables; every transaction sets `app.tenant_id`, which row-level security reads."""

    name: ClassVar[str] = "row"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        setup = (_ROW_SETUP, {"path": ROW_TENANT_SEARCH_PATH, "tenant": tenant_id})
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup)


STRATEGIES: dict[str, DatabaseStrategy | SchemaStrategy | RowStrategy] = {
    strategy.name: strategy for strategy in (DatabaseStrategy(), SchemaStrategy(), RowStrategy())
}


def place(tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
    return STRATEGIES[settings.strategy].place(tenant_id, settings, default_cluster)
