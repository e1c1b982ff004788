"""The example tables as `create_all` made them before Alembic: items, with row-level security.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-28

Deployments made by `create_all` hold exactly these tables: `python -m app migrate` stamps
them at this revision instead of creating them again (`app.db.migrate.BASELINE`).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pg_session_router.db.tenancy import CURRENT_ROW_TENANT_SQL
from pg_session_router.migrations.ops import (
    disable_tenant_row_security,
    enable_tenant_row_security,
)

#: The row policy as this revision made it (0002 replaces it): written out, so that this
#: revision does the same whatever the library's current policy is.
ROW_POLICY_0001 = (
    "tenant_id IS NOT DISTINCT FROM NULLIF(current_setting('app.tenant_id', true), '')"
)

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tenant_id", sa.Text(), server_default=sa.text(CURRENT_ROW_TENANT_SQL)),
    )
    op.create_index("ix_items_tenant_id", "items", ["tenant_id"])
    enable_tenant_row_security("items", ROW_POLICY_0001)


def downgrade() -> None:
    disable_tenant_row_security("items")
    op.drop_index("ix_items_tenant_id", table_name="items")
    op.drop_table("items")
