"""The example app over HTTP: tenant-scoped items, error statuses, commit-before-response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.session import get_db, provider
from app.main import app, create_app
from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.web import install_router


def client_for(asgi_app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url="http://test")


@pytest.fixture
async def client(router: SessionRouter) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as client:
        yield client


async def test_create_then_fetch_and_list(client: httpx.AsyncClient, pg: DevCluster) -> None:
    created = await client.post("/items", json={"name": "anvil"}, headers={"X-Tenant-ID": "acme"})
    assert created.status_code == 201
    item = created.json()
    assert item["name"] == "anvil" and isinstance(item["id"], int)
    pg.wait_replayed()  # GETs read from replicas
    fetched = await client.get(f"/items/{item['id']}", headers={"X-Tenant-ID": "acme"})
    assert fetched.status_code == 200 and fetched.json() == item
    listed = await client.get("/items", headers={"X-Tenant-ID": "acme"})
    assert item in listed.json()


async def test_tenants_see_only_their_own_items(client: httpx.AsyncClient, pg: DevCluster) -> None:
    tenants = ["acme", "umbrella", "globex", "soylent-corp", "initech", "hooli"]
    for tenant in tenants:
        response = await client.post(
            "/items", json={"name": f"only-{tenant}"}, headers={"X-Tenant-ID": tenant}
        )
        assert response.status_code == 201
    pg.wait_replayed()
    for tenant in tenants:
        names = {
            item["name"]
            for item in (
                await client.get("/items?limit=1000", headers={"X-Tenant-ID": tenant})
            ).json()
        }
        assert f"only-{tenant}" in names
        assert not {f"only-{other}" for other in tenants if other != tenant} & names


async def test_missing_item_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/999999999", headers={"X-Tenant-ID": "globex"})
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("tenant", "status", "code"),
    [
        ("", 400, "invalid_tenant"),
        ("x" * 300, 400, "invalid_tenant"),
        ("ACME", 400, "invalid_tenant"),
        ("../x", 400, "invalid_tenant"),
        ("a;drop table items", 400, "invalid_tenant"),
        ("acm%C3%A9", 400, "invalid_tenant"),
        ("nobody", 404, "unknown_tenant"),
        ("oldco", 403, "tenant_inactive"),
    ],
)
async def test_bad_tenants_get_4xx_and_never_a_default_database(
    client: httpx.AsyncClient, tenant: str, status: int, code: str
) -> None:
    for method, path in (("GET", "/items"), ("POST", "/items"), ("GET", "/items/1")):
        response = await client.request(
            method, path, json={"name": "leak"}, headers={"X-Tenant-ID": tenant}
        )
        assert response.status_code == status, (method, path, response.text)
        assert response.json()["error"] == code
    async with provider.get().session() as session:
        assert await session.scalar(text("SELECT count(*) FROM items WHERE name = 'leak'")) == 0


async def test_non_ascii_and_nul_tenant_headers_are_400(client: httpx.AsyncClient) -> None:
    for raw in ("acmé".encode(), b"a\x00b"):
        response = await client.get("/items", headers=[(b"X-Tenant-ID", raw)])
        assert response.status_code == 400


async def test_tenant_routes_require_a_tenant(client: httpx.AsyncClient) -> None:
    response = await client.get("/items")
    assert response.status_code == 400
    assert response.json()["error"] == "tenant_required"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/items", {"name": ""}),
        ("POST", "/items", {"name": "x" * 201}),
        ("POST", "/items", {"name": "nul\x00byte"}),
        ("POST", "/items", {"nom": "wrong key"}),
        ("POST", "/items", None),
        ("GET", "/items/not-a-number", None),
        ("GET", "/items/99999999999999999999999", None),
        ("GET", "/items/-1", None),
        ("GET", "/items?limit=0", None),
        ("GET", "/items?limit=abc", None),
    ],
)
async def test_bad_input_is_4xx_not_500(
    client: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    response = await client.request(method, path, json=body, headers={"X-Tenant-ID": "initech"})
    assert 400 <= response.status_code < 500, response.text


async def test_health_details_are_for_operators_only(router: SessionRouter) -> None:
    token = "an-operators-token-of-32-bytes-or-more"
    provider = RouterProvider(RouterSettings(http=HttpSettings(health_token=token)))  # type: ignore[arg-type]
    provider.set(router)
    async with client_for(create_app(provider)) as operators_app:
        anonymous = await operators_app.get("/health/db")
        forged = await operators_app.get("/health/db", headers={"Authorization": "Bearer guess"})
        operator = await operators_app.get(
            "/health/db", headers={"Authorization": f"Bearer {token}"}
        )
    assert anonymous.json() == {"status": "ok"} and forged.json() == {"status": "ok"}
    nodes = operator.json()["nodes"]
    assert {"main.primary", "main.replica1", "main.replica2"} <= set(nodes)
    assert nodes["main.primary"]["role"] == "primary"
    assert "127.0.0.1" not in operator.text and "endpoint" not in nodes["main.primary"]


async def test_health_details_name_no_address_even_in_failure_reasons(
    router: SessionRouter,
) -> None:
    provider = RouterProvider(RouterSettings(http=HttpSettings(health_details_public=True)))
    provider.set(router)
    replica = router.node("main.replica2").health
    replica.eject("probe failed: OSError: Connect call failed ('10.9.8.7', 5432)")
    try:
        async with client_for(create_app(provider)) as client:
            body = (await client.get("/health/db")).json()
    finally:
        replica.admit()
    assert body["status"] == "degraded"
    assert body["nodes"]["main.replica2"]["reason"] == "probe failed: OSError"
    assert "10.9.8.7" not in str(body)


async def test_a_failed_commit_is_never_reported_as_success(router: SessionRouter) -> None:
    """Plain `Depends(get_db)`, as users write it: the commit happens before the response."""
    checks = FastAPI()
    install_router(checks, provider=provider)

    @checks.post("/pair/{x}")
    async def insert_pair(x: int, db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
        # Passes now; the deferred unique constraint fails at COMMIT.
        await db.execute(text("INSERT INTO deferred_check VALUES (:x), (:x)"), {"x": x})
        return {"status": "ok"}

    @checks.post("/single/{x}")
    async def insert_one(x: int, db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
        await db.execute(text("INSERT INTO deferred_check VALUES (:x)"), {"x": x})
        return {"status": "ok"}

    async with client_for(checks) as client:
        failed = await client.post("/pair/41")
        succeeded = await client.post("/single/42")
    assert failed.status_code == 409
    assert succeeded.status_code == 200
    async with router.session() as session:
        rows = (
            await session.scalars(text("SELECT x FROM deferred_check WHERE x IN (41, 42)"))
        ).all()
        await session.execute(text("DELETE FROM deferred_check"))
    assert rows == [42]


async def test_lifespan_builds_the_router_and_disposes_every_engine(
    router: SessionRouter,
) -> None:
    async with app.router.lifespan_context(app):
        assert provider.get() is router
        async with router.session("replica") as session:
            await session.execute(text("SELECT 1"))
        pools = [node.engine.pool for node in router.clusters["main"].nodes]
        assert sum(pool.checkedin() for pool in pools) >= 1  # type: ignore[attr-defined]
    assert sum(pool.checkedin() for pool in pools) == 0  # type: ignore[attr-defined]
