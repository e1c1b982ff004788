"""Checks that span keys, and `load_settings`: settings that are wrong never reach a router.

`settings` describes (pydantic models, one field each); this module judges a whole
configuration: references between clusters and tenants, storage owned by one tenant
(`storage`), the connection budget, and the sources a host reads settings from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from pg_session_router.core.errors import ConfigError
from pg_session_router.core.names import default_schema_name, schema_problem
from pg_session_router.core.settings import (
    DEFAULT_ENV_PREFIX,
    DatabaseSettings,
    PoolSettings,
    RouterSettings,
    TenantSettings,
    format_validation_error,
)
from pg_session_router.core.storage import first_conflict, reserved_schema_names


def load_settings(
    config_file: Path | str | None = None,
    *,
    env_prefix: str = DEFAULT_ENV_PREFIX,
    env_file: Path | str | None = ".env",
    **overrides: Any,
) -> RouterSettings:
    """Build and check settings; every problem becomes a `ConfigError` naming its key.

    `config_file`: a TOML file (must exist when given). `env_prefix`: the prefix of the
    environment variables read (`<prefix>DATABASE__CLUSTERS__MAIN__PRIMARY=...`).
    """
    path = Path(config_file) if config_file is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    # A subclass per call carries the host's prefix and file into pydantic-settings' sources
    # (they read them from model_config); built at startup only, so its cost does not matter.
    configured = type(
        "RouterSettings",
        (RouterSettings,),
        {
            "model_config": SettingsConfigDict(
                env_prefix=env_prefix, env_file=env_file, toml_file=path
            )
        },
    )
    try:
        settings: RouterSettings = configured(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    check_database_settings(settings.database)
    return settings


def check_database_settings(database: DatabaseSettings) -> None:
    """Checks that span several keys (references between clusters and tenants)."""
    if database.default_cluster not in database.clusters:
        raise ConfigError(
            f"database.default_cluster: no cluster named {database.default_cluster!r} "
            f"(configure database.clusters.{database.default_cluster}.primary)"
        )
    for name, cluster in database.clusters.items():
        if cluster.nodes and (cluster.primary or cluster.replicas):
            raise ConfigError(
                f"database.clusters.{name}.nodes: give either nodes, or primary and replicas"
            )
        if not cluster.nodes and cluster.primary is None:
            raise ConfigError(f"database.clusters.{name}.primary: required (or give nodes)")
    for tenant_id, tenant in database.tenants.items():
        check_tenant(database, tenant_id, tenant)
    conflict = first_conflict(database, database.tenants)
    if conflict is not None:
        raise ConfigError(f"database.tenants.{conflict}")
    _check_connection_budget(database)


def _node_count(cluster: Any) -> int:
    return int(cluster.primary is not None) + len(cluster.replicas) + len(cluster.nodes)


def pool_connections(pool: PoolSettings) -> int:
    return pool.size + pool.max_overflow


def _check_connection_budget(database: DatabaseSettings) -> None:
    if database.max_connections is None:
        return
    clusters = sum(
        pool_connections(c.pool) * (int(c.primary is not None) + len(c.replicas) + len(c.nodes))
        for c in database.clusters.values()
    )
    tenants = database.tenancy.max_engines * pool_connections(database.tenancy.pool)
    if clusters + tenants > database.max_connections:
        raise ConfigError(
            f"database.max_connections: the pools may open up to {clusters + tenants} "
            f"connections ({clusters} for clusters, {tenants} for tenant engines: "
            "tenancy.max_engines x tenancy.pool size + max_overflow); raise the cap or shrink them"
        )


def check_tenant(database: DatabaseSettings, tenant_id: str, tenant: TenantSettings) -> None:
    """What a tenant's settings must agree on with the rest of the configuration."""
    key = f"database.tenants.{tenant_id}"
    if tenant.cluster is not None and tenant.cluster not in database.clusters:
        raise ConfigError(f"{key}.cluster: no cluster named {tenant.cluster!r}")
    if tenant.strategy == "database" and tenant.url is None:
        nodes = _node_count(database.clusters[tenant.cluster or database.default_cluster])
        if nodes > database.tenancy.max_engines:
            raise ConfigError(
                f"{key}: its cluster has {nodes} nodes, more engines than "
                f"database.tenancy.max_engines ({database.tenancy.max_engines}) allows"
            )
    if tenant.strategy == "schema":
        schema = tenant.schema_name or default_schema_name(tenant_id)
        problem = schema_problem(schema)
        if problem is None and schema in reserved_schema_names(database):
            # A schema named after a role the router connects as would come first in every
            # search_path that starts with "$user" (PostgreSQL's default).
            problem = f"schema {schema!r} is reserved (a role the router connects as)"
        if problem is not None:
            raise ConfigError(f"{key}: {problem} (name the schema with `schema`)")
