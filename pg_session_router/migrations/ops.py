"""Operations for revision scripts: what the router's tenancy needs of a table.

    from pg_session_router.migrations.ops import enable_tenant_row_security
    enable_tenant_row_security("items")   # in upgrade(), after op.create_table("items", ...)

The statements are unqualified: they apply to the target being migrated (its search path).
"""

from __future__ import annotations

from alembic import op

from pg_session_router.db.migrate import (
    ROW_TENANT_CONDITION,
    row_security_removal_statements,
    row_security_statements,
)


def enable_tenant_row_security(table: str, condition: str = ROW_TENANT_CONDITION) -> None:
    """Rows of `row` tenants visible only to their tenant's transactions (FORCE: to the
    table's owner too). The table needs a `tenant_id` column. Replaces the table's policy.

    `condition`: the library's current one by default. A revision that must do the same thing
    whenever it runs, whatever the library's version, passes its own text (the example app's
    revisions do)."""
    for statement in row_security_statements(table, None, condition):
        op.execute(statement)


def disable_tenant_row_security(table: str) -> None:
    """The reverse, for `downgrade()`."""
    for statement in row_security_removal_statements(table):
        op.execute(statement)
