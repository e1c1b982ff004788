"""Tenants: validating ids, looking them up, and the three placement strategies.

A placement answers two questions for the router: which cluster holds the tenant's data, and
what must run at the start of each transaction to confine it (nothing for `database`;
`search_path` for `schema`; `app.tenant_id` for `row`). Both settings are transaction-local
(`set_config(..., true)`), so a pooled connection carries nothing into the next transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

from app.core.config import TENANT_ID_PATTERN, TenantSettings
from app.db.errors import InvalidTenantError, TenantInactiveError, UnknownTenantError

TransactionSetup = tuple[TextClause, dict[str, Any]]

# Built once: compiled-statement caching keys on this object.
_SET_CONFIG = text("SELECT set_config(:name, :value, true)")
ROW_TENANT_SETTING = "app.tenant_id"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def default_schema_name(tenant_id: str) -> str:
    return tenant_id.replace("-", "_")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tenant lives: the cluster key and the per-transaction setup, if any."""

    tenant_id: str
    strategy: str
    cluster_key: str
    transaction_setup: TransactionSetup | None
    #: For `schema`: the schema that holds the tenant's tables.
    schema: str | None = None


def database_placement(tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
    if settings.url is not None:
        key = f"@{tenant_id}"  # a server of its own, built from `url`
    elif settings.database is not None:
        key = f"{settings.cluster or default_cluster}@{settings.database}"
    else:
        assert settings.cluster is not None
        key = settings.cluster
    return Placement(tenant_id, "database", key, None)


def schema_placement(tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
    schema = settings.schema_name or default_schema_name(tenant_id)
    setup = (_SET_CONFIG, {"name": "search_path", "value": quote_identifier(schema)})
    return Placement(tenant_id, "schema", settings.cluster or default_cluster, setup, schema)


def row_placement(tenant_id: str, settings: TenantSettings, default_cluster: str) -> Placement:
    setup = (_SET_CONFIG, {"name": ROW_TENANT_SETTING, "value": tenant_id})
    return Placement(tenant_id, "row", settings.cluster or default_cluster, setup)


PLACEMENTS: dict[str, Callable[[str, TenantSettings, str], Placement]] = {
    "database": database_placement,
    "schema": schema_placement,
    "row": row_placement,
}


def validate_tenant_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_ID_PATTERN.fullmatch(tenant_id):
        # Never echo the raw input: it is attacker-controlled (and may be huge or binary).
        raise InvalidTenantError(
            "malformed tenant id: expected 1-63 characters of [a-z0-9_-], starting with [a-z0-9]"
        )
    return tenant_id


class TenantRegistry:
    """Tenant id -> `Placement`, built once from the configuration."""

    def __init__(self, tenants: Mapping[str, TenantSettings], default_cluster: str) -> None:
        self._settings = dict(tenants)
        self._placements = {
            tenant_id: PLACEMENTS[settings.strategy](tenant_id, settings, default_cluster)
            for tenant_id, settings in tenants.items()
        }

    def placement(self, tenant_id: str) -> Placement:
        placement = self._placements.get(tenant_id)
        if placement is None:
            validate_tenant_id(tenant_id)
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
        if not self._settings[tenant_id].active:
            raise TenantInactiveError(f"tenant {tenant_id!r} is disabled")
        return placement

    def settings(self, tenant_id: str) -> TenantSettings:
        return self._settings[tenant_id]

    def __iter__(self) -> Any:
        return iter(self._placements.values())

    def __len__(self) -> int:
        return len(self._placements)
