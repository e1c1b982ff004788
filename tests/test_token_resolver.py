"""The signed-token resolver fails closed: weak keys, tokens that never expire, forged or
oversized tokens, and apps mounted under others never fall back to a bare header."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import text

from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.web import TenantDbSession, install_router
from pg_session_router.web.resolvers import sign_token

SECRET = "a-signing-key-that-is-32-bytes-long"


def token_app(router: SessionRouter, **http: Any) -> FastAPI:
    settings = RouterSettings(
        http=HttpSettings.model_validate(
            {"tenant_resolver": "token", "token_secret": SECRET, **http}
        )
    )
    provider = RouterProvider(settings)
    provider.set(router)
    app = FastAPI()
    install_router(app, provider=provider)

    @app.get("/db")
    async def db(session: TenantDbSession) -> str | None:
        return await session.scalar(text("SELECT current_database()"))

    return app


async def get(app: FastAPI, path: str, **headers: str | bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


def bearer(claims: dict[str, Any], secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {sign_token(claims, secret.encode())}"}


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_weak_signing_keys_are_refused_in_settings(secret: str) -> None:
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        HttpSettings.model_validate({"tenant_resolver": "token", "token_secret": secret})


async def test_a_bare_header_is_never_accepted_even_in_a_mounted_app(
    router: SessionRouter,
) -> None:
    outer = FastAPI()
    outer.mount("/inner", token_app(router))
    for app, path in ((token_app(router), "/db"), (outer, "/inner/db")):
        bare = await get(app, path, **{"X-Tenant-ID": "acme"})
        assert bare.status_code == 400 and bare.json()["error"] == "tenant_required"
        signed = await get(app, path, **bearer({"tenant": "acme", "exp": time.time() + 60}))
        assert signed.status_code == 200 and signed.json() == "acme"


async def test_audience_and_issuer_are_checked_when_configured(router: SessionRouter) -> None:
    app = token_app(router, token_audience="orders-api", token_issuer="https://idp.example")
    good = {"tenant": "acme", "exp": time.time() + 60, "iss": "https://idp.example"}
    assert (await get(app, "/db", **bearer({**good, "aud": "orders-api"}))).status_code == 200
    assert (
        await get(app, "/db", **bearer({**good, "aud": ["x", "orders-api"]}))
    ).status_code == 200
    for claims in (
        good,  # no audience
        {**good, "aud": "billing-api"},
        {**good, "aud": "orders-api", "iss": "https://evil.example"},
    ):
        response = await get(app, "/db", **bearer(claims))
        assert response.status_code == 401, claims


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_unauthenticated_junk_is_refused_before_it_is_parsed(router: SessionRouter) -> None:
    app = token_app(router)
    nested = _b64(b"[" * 100_000 + b"]" * 100_000)  # RecursionError if parsed
    header = _b64(json.dumps({"alg": "HS256"}).encode())
    for token in (
        f"{header}.{nested}.{_b64(b'not a signature')}",
        "x" * 5000,
        "a.b",
        "\u00e9.\u00e9.\u00e9",
        f"{header}.{nested}",
    ):
        response = await get(app, "/db", Authorization=f"Bearer {token}".encode("latin-1"))
        assert response.status_code == 401, token[:40]
        assert response.json()["error"] == "invalid_token"
