"""Tenant placements: which cluster holds a tenant's data, and what confines its sessions.

A *placement strategy* answers, for one tenant, which cluster holds its data and what must run
at the start of each transaction to confine it: nothing for `database` (its own database, its
own engines); for `schema` and `row`, one statement that sets on the pooled connection:
`search_path`, with `pg_temp` named last (a temporary table can never stand in for one of the
tenant's tables); `pg_session_router.tenant`, the tenant being served (the catalog's
row-level security hides every row from a connection serving one); and for row tenants
`app.tenant_id`, which the tenant tables' row-level security reads.

The settings are the connection's, not the transaction's: the router remembers which tenant
each pooled connection is set up for and sends nothing while it serves that tenant again, so
a tenant session costs no round trip more than a plain one. When a connection changes hands
(another tenant, no tenant, or use outside the router) it is reset first, in the same round
trip (`routed_session.prepare_connection`), so nothing carries over to the next user.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from sqlalchemy import TextClause, text

from pg_session_router.core.names import default_schema_name, quote_identifier, quote_literal
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db.keys import ClusterKey

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


def connection_setup(tenant_id: str, search_path: str, *, rows: bool, local: bool = False) -> str:
    """The statement that sets a connection up for a tenant (ids and schema names are
    validated before they get here; they are quoted all the same). `local`: for this
    transaction only (behind a transaction-mode pooler, the next transaction may run on
    another client's server connection)."""
    settings = [("search_path", search_path), (SERVED_TENANT_SETTING, tenant_id)]
    if rows:
        settings.append((ROW_TENANT_SETTING, tenant_id))
    scope = "true" if local else "false"
    calls = ", ".join(f"set_config('{name}', {quote_literal(v)}, {scope})" for name, v in settings)
    return f"SELECT {calls}"


def current_row_tenant() -> TextClause:
    """`server_default` for a model's `tenant_id` column: rows are stamped by the database."""
    return text(CURRENT_ROW_TENANT_SQL)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tenant lives: the cluster key and the connection setup, if any."""

    tenant_id: str
    settings: TenantSettings
    cluster_key: ClusterKey
    connection_setup: str | None
    #: The same settings for one transaction only (clusters behind a transaction pooler).
    transaction_setup: str | None
    #: `schema`: the schema holding the tenant's tables. `database`: the database name.
    schema: str | None = None
    database: str | None = None
    #: Its move to another cluster, if one is under way: "copying", "paused" (writes held
    #: while the catalog switches it), or "moved" (switched; the old storage not dropped yet).
    moving: str | None = None

    @property
    def writes_paused(self) -> bool:
        return self.moving == "paused"

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
        return Placement(tenant_id, settings, key, None, None, database=database)


class SchemaStrategy:
    """A schema in a shared database; its connections have its `search_path`."""

    name: ClassVar[str] = "schema"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        schema = settings.schema_name or default_schema_name(tenant_id)
        path = f"{quote_identifier(schema)}, pg_temp"
        setup = connection_setup(tenant_id, path, rows=False)
        local = connection_setup(tenant_id, path, rows=False, local=True)
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup, local, schema=schema)


class RowStrategy:
    """Shared tables; its connections set `app.tenant_id`, which row-level security reads."""

    name: ClassVar[str] = "row"

    def place(self, tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
        setup = connection_setup(tenant_id, ROW_TENANT_SEARCH_PATH, rows=True)
        local = connection_setup(tenant_id, ROW_TENANT_SEARCH_PATH, rows=True, local=True)
        cluster = ClusterKey.configured(settings.cluster or default_cluster)
        return Placement(tenant_id, settings, cluster, setup, local)


STRATEGIES: dict[str, DatabaseStrategy | SchemaStrategy | RowStrategy] = {
    strategy.name: strategy for strategy in (DatabaseStrategy(), SchemaStrategy(), RowStrategy())
}


def place(
    tenant_id: str, settings: TenantSettings, default_cluster: str, moving: str | None = None
) -> Placement:
    placement = STRATEGIES[settings.strategy].place(tenant_id, settings, default_cluster)
    return placement if moving is None else replace(placement, moving=moving)
