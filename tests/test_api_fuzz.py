"""No input reaches a 500: schemathesis against the example app's OpenAPI (served by uvicorn
over a real cluster), and the inputs an audit found by hand.

Generated requests (bounded: a few dozen per operation) with good, malformed and unknown
tenant ids must never get a 5xx, and every status an operation answers must be one its
OpenAPI documents, with a body of the documented shape.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import insert, text

from app.demo import demo_config
from app.main import app, create_app
from pg_session_router.core.settings import RouterSettings
from pg_session_router.db.catalog import tenants_table
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster, free_port
from tests.support.servers import uvicorn_server

from .conftest import APP_ROLE, database_settings, tenants_config


def client_for(asgi_app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url="http://test")


ROOT = Path(__file__).resolve().parent.parent
TENANTS = ["acme", "globex", "initech", "nobody", "ACME", "", "a" * 80, "acme\u00e9"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def served_app(migrated: DevCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    config = folder / "settings.toml"
    config.write_text(demo_config(migrated))  # the demo's tenants: acme, globex, initech
    env = {k: v for k, v in os.environ.items() if not k.startswith("APP_")}
    env["APP_CONFIG_FILE"] = str(config)
    with uvicorn_server(
        sys.executable, "app.main:app", cwd=ROOT, env=env, log=folder / "server.log"
    ) as url:
        yield url


def test_no_generated_request_gets_a_5xx_or_an_undocumented_status(served_app: str) -> None:
    schema = schemathesis.openapi.from_url(f"{served_app}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /items", "GET /items", "GET /items/{item_id}"}
    for operation in operations:

        @given(case=operation.as_strategy(), tenant=st.sampled_from(TENANTS))
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case, tenant: str) -> None:
            headers = {"X-Tenant-ID": tenant.encode("utf-8").decode("latin-1")}
            case.call_and_validate(base_url=served_app, headers=headers, checks=CHECKS)

        fuzz()


async def test_a_lone_surrogate_in_a_json_body_is_a_422_not_a_500(router: SessionRouter) -> None:
    async with client_for(app) as client:
        response = await client.post(
            "/items",
            content=b'{"name": "\\ud800"}',
            headers={"X-Tenant-ID": "acme", "content-type": "application/json"},
        )
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    assert "\\ud800" not in response.text


async def test_a_tenant_whose_tables_are_missing_is_a_503_not_a_500(
    migrated: DevCluster,
) -> None:
    tenants = {**tenants_config(migrated), "hollow": {"strategy": "schema"}}
    router = SessionRouter(database_settings(migrated, tenants=tenants))
    provider = RouterProvider(RouterSettings())
    provider.set(router)
    try:
        async with router.session() as session:
            await session.execute(text("CREATE SCHEMA IF NOT EXISTS hollow"))
        async with client_for(create_app(provider)) as client:
            response = await client.get("/items", headers={"X-Tenant-ID": "hollow"})
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "tenant_storage_missing"
        assert "Retry-After" in response.headers and "main." not in response.text
    finally:
        async with router.session() as session:
            await session.execute(text("DROP SCHEMA IF EXISTS hollow"))
        await router.dispose()


async def test_a_catalog_row_naming_an_unknown_cluster_is_a_404_not_a_500(
    router: SessionRouter,
) -> None:
    async with router.session() as session:
        await session.execute(
            insert(tenants_table).values(id="lost", strategy="schema", cluster="nowhere")
        )
    try:
        async with client_for(app) as client:
            response = await client.get("/items", headers={"X-Tenant-ID": "lost"})
        assert response.status_code == 404 and response.json()["error"] == "unknown_tenant"
    finally:
        async with router.session() as session:
            await session.execute(tenants_table.delete().where(tenants_table.c.id == "lost"))


async def test_a_503_names_no_server_and_the_log_has_the_details(
    migrated: DevCluster, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    closed = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{port}/app"
    settings = database_settings(
        migrated, clusters={"main": {"primary": closed}}, retry={"deadline": 0.3}
    )
    provider = RouterProvider(RouterSettings())
    provider.set(SessionRouter(settings))
    try:
        async with client_for(create_app(provider)) as client:
            response = await client.post(
                "/items", json={"name": "x"}, headers={"X-Tenant-ID": "initech"}
            )
    finally:
        await provider.dispose()
    assert response.status_code == 503 and response.headers["Retry-After"].isdigit()
    assert str(port) not in response.text and "main." not in response.text
    assert any(
        str(port) in record.getMessage() or "main.primary" in record.getMessage()
        for record in caplog.records
    )
