"""Row-level security on items that the planner estimates and indexes serve.

Revision ID: 0002_row_policy
Revises: 0001_initial
Create Date: 2026-11-29

The same rows as 0001's policy (`tenant_id IS NOT DISTINCT FROM <tenant>`), written as
`tenant_id = <tenant>` or both NULL: with 0001's form the planner estimated one row for any
table, and `ORDER BY id LIMIT 10` scanned and sorted the whole table (see
`pg_session_router.db.migrate.ROW_TENANT_CONDITION`, the library's current form). Both
policies are written out here, so that upgrade and downgrade do the same whenever they run.
"""

from collections.abc import Sequence

from pg_session_router.migrations.ops import enable_tenant_row_security

revision: str = "0002_row_policy"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TENANT = "NULLIF(current_setting('app.tenant_id', true), '')"
ROW_POLICY_0002 = f"(tenant_id = {_TENANT} OR (tenant_id IS NULL AND {_TENANT} IS NULL))"
ROW_POLICY_0001 = f"tenant_id IS NOT DISTINCT FROM {_TENANT}"


def upgrade() -> None:
    enable_tenant_row_security("items", ROW_POLICY_0002)  # replaces 0001's policy


def downgrade() -> None:
    enable_tenant_row_security("items", ROW_POLICY_0001)
