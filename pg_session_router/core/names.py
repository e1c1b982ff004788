"""The naming rules every layer shares: tenant ids, schema and cluster names, SQL identifiers.

One place for each rule, so that the configuration file, the catalog, the registry and the
command line accept and refuse exactly the same names.
"""

from __future__ import annotations

import re

from pg_session_router.core.errors import InvalidTenantError

TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: Schema and cluster names: lower-case SQL identifiers that need no quoting, 1-63 bytes.
IDENTIFIER_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
TENANT_ID_RULE = "1-63 characters of [a-z0-9_-], starting with [a-z0-9]"


def is_tenant_id(value: object) -> bool:
    return isinstance(value, str) and TENANT_ID_PATTERN.fullmatch(value) is not None


def validate_tenant_id(tenant_id: object) -> str:
    """The id itself, or `InvalidTenantError` (400) for anything else."""
    if not is_tenant_id(tenant_id):
        # Never echo the raw input: it is attacker-controlled (and may be huge or binary).
        raise InvalidTenantError(f"malformed tenant id: expected {TENANT_ID_RULE}")
    assert isinstance(tenant_id, str)
    return tenant_id


def default_schema_name(tenant_id: str) -> str:
    return tenant_id.replace("-", "_")


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
