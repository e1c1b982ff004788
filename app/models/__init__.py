"""Example ORM models used by the demo app and the tests."""

from __future__ import annotations

from sqlalchemy import BigInteger, Identity, Index, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Rows written by a `row`-placed tenant carry its id; the default reads the transaction-local
# setting the router makes, so application code never passes tenant_id by hand.
CURRENT_ROW_TENANT = text("NULLIF(current_setting('app.tenant_id', true), '')")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_tenant_id", "tenant_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(Text, server_default=CURRENT_ROW_TENANT)
