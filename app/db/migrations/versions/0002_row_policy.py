"""Row-level security on items that the planner estimates and indexes serve.

Revision ID: 0002_row_policy
Revises: 0001_initial
Create Date: 2026-11-29

The same rows as 0001's policy (`tenant_id IS NOT DISTINCT FROM <tenant>`), written as
`tenant_id = <tenant>` or both NULL: with the old form the planner estimated one row for any
table, and `ORDER BY id LIMIT 10` scanned and sorted the whole table (see
`pg_session_router.db.migrate.ROW_TENANT_CONDITION`).
"""

from collections.abc import Sequence

from alembic import op

from pg_session_router.db.migrate import row_security_statements
from pg_session_router.db.tenancy import CURRENT_ROW_TENANT_SQL
from pg_session_router.migrations.ops import enable_tenant_row_security

revision: str = "0002_row_policy"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: 0001's policy condition, as it was written then.
_PREVIOUS_CONDITION = f"tenant_id IS NOT DISTINCT FROM {CURRENT_ROW_TENANT_SQL}"


def upgrade() -> None:
    enable_tenant_row_security("items")  # replaces the policy (DROP POLICY IF EXISTS first)


def downgrade() -> None:
    for statement in row_security_statements("items", None, _PREVIOUS_CONDITION):
        op.execute(statement)
