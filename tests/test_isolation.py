"""Tenant isolation under concurrency: 30 tenants over the three placements, thousands of
interleaved HTTP requests from many clients, and not one row crosses a tenant boundary."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select, text

from app.main import app
from app.models import Base, Item
from pg_session_router.core.errors import CrossTenantError
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.router import SessionRouter

TENANTS_PER_STRATEGY = 10
CLIENTS = 40
REQUESTS = 3000


@pytest.fixture
async def thirty_tenants(router: SessionRouter) -> AsyncIterator[list[str]]:
    run = uuid.uuid4().hex[:6]
    tenants = []
    for strategy in ("database", "schema", "row"):
        for i in range(TENANTS_PER_STRATEGY):
            tenant = f"iso-{strategy[:2]}{i}-{run}"
            settings = {"strategy": strategy}
            if strategy == "database":
                settings["database"] = tenant.replace("-", "_")
            await provisioning.add_tenant(
                router, tenant, TenantSettings.model_validate(settings), metadata=Base.metadata
            )
            tenants.append(tenant)
    try:
        yield tenants
    finally:
        for tenant in tenants:
            await provisioning.remove_tenant(router, tenant, drop=True, metadata=Base.metadata)


async def test_thousands_of_interleaved_requests_never_cross_tenants(
    router: SessionRouter, thirty_tenants: list[str]
) -> None:
    rng = random.Random(1234)
    plan = [
        (rng.choice(thirty_tenants), rng.choice(["post", "list", "report"]))
        for _ in range(REQUESTS)
    ]
    problems: list[str] = []
    created: dict[str, int] = dict.fromkeys(thirty_tenants, 0)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:

        async def one(tenant: str, kind: str) -> None:
            headers = {"X-Tenant-ID": tenant}
            if kind == "post":
                response = await client.post(
                    "/items", json={"name": f"{tenant}:item"}, headers=headers
                )
                if response.status_code != 201:
                    problems.append(f"POST {tenant}: {response.status_code} {response.text}")
                created[tenant] += 1
                return
            path = "/items?limit=1000" if kind == "list" else "/reports/items?limit=1000"
            response = await client.get(path, headers=headers)
            if response.status_code != 200:
                problems.append(f"GET {path} {tenant}: {response.status_code}")
                return
            body = response.json()
            rows = body if kind == "list" else body["latest"]
            strangers = [row["name"] for row in rows if row["name"] != f"{tenant}:item"]
            if strangers:
                problems.append(f"{tenant} saw {strangers[:3]}")

        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        for step in plan:
            queue.put_nowait(step)

        async def client_loop() -> None:
            while not queue.empty():
                await one(*queue.get_nowait())

        await asyncio.gather(*(client_loop() for _ in range(CLIENTS)))

    assert problems == []
    for tenant in thirty_tenants:  # and the primaries hold exactly what each tenant wrote
        async with router.session(tenant=tenant) as session:
            names = (await session.scalars(text("SELECT name FROM items"))).all()
        assert names == [f"{tenant}:item"] * created[tenant]


async def test_a_session_never_mixes_tenants(router: SessionRouter) -> None:
    async with router.session(tenant="initech") as session:
        session.add(Item(name="initech-only"))
    async with router.session(tenant="initech") as session:
        item = (await session.scalars(select(Item).where(Item.name == "initech-only"))).one()
    for other in ("hooli", None):
        with pytest.raises(CrossTenantError, match="never mix tenants"):
            async with router.session(tenant=other) as session:
                session.add(item)
        with pytest.raises(CrossTenantError):
            async with router.session(tenant=other) as session:
                await session.merge(item)
    async with router.session(tenant="hooli") as session:  # nothing reached hooli's rows
        assert not (await session.scalars(select(Item).where(Item.name == "initech-only"))).all()
