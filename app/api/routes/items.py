"""Tenant-scoped example routes: create, list and fetch items."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select

from app.models import Item
from pg_session_router.web import TenantReadSession, TenantWriteSession
from pg_session_router.web.errors import TENANT_ROUTE_RESPONSES

router = APIRouter(prefix="/items", tags=["items"], responses=TENANT_ROUTE_RESPONSES)

_MAX_ID = 2**63 - 1


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def no_control_characters(cls, value: str) -> str:
        if any(ord(char) < 32 for char in value):
            raise ValueError("must not contain control characters")
        return value


class ItemOut(BaseModel):
    id: int
    name: str


@router.post("", status_code=201)
async def create_item(body: ItemIn, db: TenantWriteSession) -> ItemOut:
    item = Item(name=body.name)
    db.add(item)
    await db.flush()
    return ItemOut(id=item.id, name=item.name)


@router.get("")
async def list_items(
    db: TenantReadSession, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[ItemOut]:
    rows = await db.scalars(select(Item).order_by(Item.id).limit(limit))
    return [ItemOut(id=item.id, name=item.name) for item in rows]


@router.get("/{item_id}")
async def get_item(
    db: TenantReadSession, item_id: Annotated[int, Path(ge=1, le=_MAX_ID)]
) -> ItemOut:
    item = await db.get(Item, item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="item not found")
    return ItemOut(id=item.id, name=item.name)
