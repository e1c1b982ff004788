"""The naming rules every layer shares: tenant ids, schema, database and cluster names.

One place for each rule, so that the configuration file, the catalog, the registry and the
command line accept and refuse exactly the same names. Every pattern is applied with
`fullmatch` (a `$` anchor would accept a trailing newline), and every name fits PostgreSQL's
63-byte identifier limit, so the server never truncates two names into one.
"""

from __future__ import annotations

import re

from pg_session_router.core.errors import InvalidTenantError

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: Schema, database and cluster names: lower-case SQL identifiers that need no quoting.
IDENTIFIER_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
TENANT_ID_RULE = "1-63 characters of [a-z0-9_-], starting with [a-z0-9]"
IDENTIFIER_RULE = "1-63 characters of [a-z0-9_], starting with [a-z_]"

#: Schemas no tenant may be placed in: shared by everyone, or the server's own.
RESERVED_SCHEMAS = frozenset({"public", "information_schema"})
#: Databases no tenant may own: the server's own.
RESERVED_DATABASES = frozenset({"postgres", "template0", "template1"})


def is_tenant_id(value: object) -> bool:
    return isinstance(value, str) and TENANT_ID_PATTERN.fullmatch(value) is not None


def is_identifier(value: object) -> bool:
    return isinstance(value, str) and IDENTIFIER_PATTERN.fullmatch(value) is not None


def validate_tenant_id(tenant_id: object) -> str:
    """The id itself, or `InvalidTenantError` (400) for anything else."""
    if not is_tenant_id(tenant_id):
        # Never echo the raw input: it is attacker-controlled (and may be huge or binary).
        raise InvalidTenantError(f"malformed tenant id: expected {TENANT_ID_RULE}")
    assert isinstance(tenant_id, str)
    return tenant_id


def schema_problem(name: str) -> str | None:
    """Why `name` cannot be a tenant's schema, or None."""
    if not is_identifier(name):
        return f"a schema name is {IDENTIFIER_RULE}"
    if name in RESERVED_SCHEMAS or name.startswith("pg_"):
        return f"schema {name!r} is reserved (public, information_schema, pg_*)"
    return None


def database_problem(name: str) -> str | None:
    """Why `name` cannot be a tenant's database, or None."""
    if not is_identifier(name):
        return f"a database name is {IDENTIFIER_RULE}"
    if name in RESERVED_DATABASES:
        return f"database {name!r} is reserved (postgres, template0, template1)"
    return None


def default_schema_name(tenant_id: str) -> str:
    return tenant_id.replace("-", "_")


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings, on since PostgreSQL 9.1)."""
    return "'" + value.replace("'", "''") + "'"
