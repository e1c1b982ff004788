"""Tenant resolution for HTTP: header (default), subdomain, path parameter, signed token."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import text

from app.db import session
from pg_session_router.core.errors import ConfigError
from pg_session_router.core.settings import HttpSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.web import DbSession, install_router, require_tenant
from pg_session_router.web.resolvers import (
    HeaderResolver,
    PathResolver,
    SubdomainResolver,
    TenantResolver,
    TokenClaimResolver,
    build_tenant_resolver,
    sign_token,
)

SECRET = b"a-test-signing-key-of-32-bytes-ok"
WHERE = text("SELECT current_database() || '|' || current_setting('search_path')")


def app_with(resolver: TenantResolver) -> FastAPI:
    app = FastAPI()
    install_router(app, provider=session.provider, tenant_resolver=resolver)
    routes = APIRouter(dependencies=[Depends(require_tenant)])

    @routes.get("/where")
    async def where(db: DbSession) -> dict[str, Any]:
        return {"where": await db.scalar(WHERE)}

    @routes.get("/t/{tenant}/where")
    async def where_by_path(tenant: str, db: DbSession) -> dict[str, Any]:
        return {"where": await db.scalar(WHERE)}

    app.include_router(routes)
    return app


async def call(app: FastAPI, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, **kwargs)


async def test_header_resolver_with_a_custom_header(router: SessionRouter) -> None:
    app = app_with(HeaderResolver("X-Org"))
    response = await call(app, "/where", headers={"X-Org": "acme"})
    assert response.json()["where"].startswith("acme|")
    assert (await call(app, "/where", headers={"X-Tenant-ID": "acme"})).status_code == 400


async def test_subdomain_resolver(router: SessionRouter) -> None:
    app = app_with(SubdomainResolver("example.com"))
    globex = await call(app, "/where", headers={"host": "globex.example.com:8443"})
    assert globex.json()["where"] == 'app|"globex", pg_temp'
    assert (await call(app, "/where", headers={"host": "example.com"})).status_code == 400
    assert (await call(app, "/where", headers={"host": "a.b.example.com"})).status_code == 400
    assert (await call(app, "/where", headers={"host": "evil.com"})).status_code == 400
    assert (await call(app, "/where", headers={"host": "nobody.example.com"})).status_code == 404


async def test_path_resolver(router: SessionRouter) -> None:
    app = app_with(PathResolver("tenant"))
    assert (await call(app, "/t/acme/where")).json()["where"].startswith("acme|")
    assert (await call(app, "/t/ACME/where")).status_code == 400
    assert (await call(app, "/where")).status_code == 400  # no path parameter: no tenant


@pytest.mark.parametrize(
    ("claims", "key", "status"),
    [
        ({"tenant": "acme", "exp": +60}, SECRET, 200),
        ({"tenant": "acme"}, SECRET, 401),  # no expiry: a token that never expires is refused
        ({"tenant": "acme", "exp": "9999999999"}, SECRET, 401),  # not a number
        ({"tenant": "acme", "exp": +60}, b"another key, also 32 bytes long!!", 401),
        ({"tenant": "acme", "exp": -1}, SECRET, 401),
        ({"tenant": "acme", "exp": +60, "nbf": +30}, SECRET, 401),
        ({"sub": "someone", "exp": +60}, SECRET, 401),
        ({"tenant": "nobody", "exp": +60}, SECRET, 404),
        (None, SECRET, 401),
    ],
)
async def test_token_claim_resolver(
    router: SessionRouter, claims: dict[str, Any] | None, key: bytes, status: int
) -> None:
    if claims is None:
        tokens = ["not.a.token", "garbage"]
    else:
        for field in ("exp", "nbf"):  # relative to now, when the test runs
            if isinstance(claims.get(field), int):
                claims = {**claims, field: time.time() + claims[field]}
        tokens = [sign_token(claims, key)]
    app = app_with(TokenClaimResolver(SECRET))
    for token in tokens:
        response = await call(app, "/where", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status, response.text
        if status == 200:
            assert response.json()["where"].startswith("acme|")


async def test_a_token_with_a_forged_algorithm_is_refused(router: SessionRouter) -> None:
    unsigned = (
        sign_token({"tenant": "acme"}, SECRET)
        .rsplit(".", 1)[0]
        .replace(sign_token({}, SECRET).split(".")[0], "eyJhbGciOiJub25lIn0", 1)
        + "."
    )
    response = await call(
        app_with(TokenClaimResolver(SECRET)),
        "/where",
        headers={"Authorization": f"Bearer {unsigned}"},
    )
    assert response.status_code == 401


def test_resolver_settings_are_checked() -> None:
    assert isinstance(build_tenant_resolver(HttpSettings()), HeaderResolver)
    with pytest.raises(ConfigError, match=r"http\.base_domain"):
        build_tenant_resolver(HttpSettings(tenant_resolver="subdomain"))
    with pytest.raises(ConfigError, match=r"http\.token_secret"):
        build_tenant_resolver(HttpSettings(tenant_resolver="token"))
    secret = "hunter2-" * 5
    settings = HttpSettings(tenant_resolver="token", token_secret=secret)  # type: ignore[arg-type]
    assert secret not in repr(settings)


async def test_two_tenant_headers_are_refused_never_guessed_between(router: SessionRouter) -> None:
    app = app_with(HeaderResolver())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get(
            "/where", headers=[("X-Tenant-ID", "acme"), ("X-Tenant-ID", "globex")]
        )
    assert response.status_code == 400 and response.json()["error"] == "invalid_tenant"
