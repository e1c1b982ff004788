"""Example ORM models used by the demo app and the tests."""

from __future__ import annotations

from sqlalchemy import BigInteger, Identity, Index, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pg_session_router.db.tenancy import current_row_tenant


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (Index("ix_items_tenant_id", "tenant_id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(Text, server_default=current_row_tenant())
