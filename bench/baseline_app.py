"""The baseline for the HTTP benchmarks: what a team writes before adopting the router.

One engine (`BASELINE_DATABASE_URL`), a hand-written `get_db` that commits before the response
(function scope, as a correct one must), and the same route bodies and models as the example
app's items, without tenants or replicas, on an `APIRouter` included in the app as the example
app's are (FastAPI matches an included router's routes through more machinery than routes on
the app itself: about 1,600 interpreter opcodes more per request). Served by uvicorn like the
example app.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.api.routes.items import ItemIn, ItemOut
from app.models import Item

engine = create_async_engine(os.environ["BASELINE_DATABASE_URL"], pool_size=5, max_overflow=5)
async_session_maker = async_sessionmaker(engine, expire_on_commit=False)
app = FastAPI()
router = APIRouter()


async def get_db() -> AsyncIterator[AsyncSession]:
    async with async_session_maker() as session:
        yield session
        await session.commit()


DbSession = Annotated[AsyncSession, Depends(get_db, scope="function")]


@router.post("/items", status_code=201)
async def create_item(body: ItemIn, db: DbSession) -> ItemOut:
    item = Item(name=body.name)
    db.add(item)
    await db.flush()
    return ItemOut(id=item.id, name=item.name)


@router.get("/items")
async def list_items(
    db: DbSession, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[ItemOut]:
    rows = await db.scalars(select(Item).order_by(Item.id).limit(limit))
    return [ItemOut(id=item.id, name=item.name) for item in rows]


app.include_router(router)
