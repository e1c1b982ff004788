"""`install_router` and the FastAPI face: one call wires an app, and nothing is silent.

Host apps here are built the way another team would: their own FastAPI app, their own lifespan,
a mounted sub-app, SQLAlchemy's own session idioms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Match

from pg_session_router.core.errors import ConfigError, RouterNotInstalledError
from pg_session_router.core.settings import RouterSettings
from pg_session_router.core.validation import load_settings
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.web import SessionMaker, get_db, install_router

from .conftest import APP_ROLE, database_settings

ROOT = Path(__file__).resolve().parent.parent
Db = Annotated[AsyncSession, Depends(get_db)]


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def installed(router: SessionRouter, app: FastAPI | None = None) -> FastAPI:
    app = app or FastAPI()
    provider = RouterProvider(RouterSettings())
    provider.set(router)
    install_router(app, provider=provider)
    return app


async def count(router: SessionRouter, x: int) -> int:
    """Rows with `x`, which are then deleted (the table is shared by other tests)."""
    async with router.session() as session:
        found = await session.scalar(
            text("SELECT count(*) FROM deferred_check WHERE x = :x"), {"x": x}
        )
        await session.execute(text("DELETE FROM deferred_check WHERE x = :x"), {"x": x})
    return int(found or 0)


async def test_without_install_router_the_dependency_says_what_is_missing() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x(db: Db) -> None: ...

    async with client_for(app) as client:
        # The message names a function that exists where it says.
        with pytest.raises(
            RouterNotInstalledError, match=r"pg_session_router\.web\.install_router"
        ):
            await client.get("/x")


async def test_installing_twice_or_with_two_sources_is_refused(router: SessionRouter) -> None:
    app = installed(router)
    with pytest.raises(ConfigError, match="already installed"):
        install_router(app, RouterSettings())
    with pytest.raises(ConfigError, match="not both"):
        install_router(FastAPI(), RouterSettings(), provider=RouterProvider())


def test_the_health_route_is_added_once_and_never_over_the_apps_own() -> None:
    def health_routes(app: FastAPI) -> list[Any]:
        scope = {"type": "http", "path": "/health/db", "method": "GET", "root_path": ""}
        return [r for r in app.router.routes if r.matches(scope)[0] == Match.FULL]

    plain = FastAPI()
    install_router(plain, RouterSettings())
    assert len(health_routes(plain)) == 1
    own = FastAPI()

    @own.get("/health/db")
    async def mine() -> dict[str, str]:
        return {"mine": "yes"}

    install_router(own, RouterSettings())
    assert [getattr(route, "endpoint", None) for route in health_routes(own)] == [mine]
    without = FastAPI()
    install_router(without, RouterSettings(), health_route=False)
    assert health_routes(without) == []
    plain.openapi()  # one operation per route: no duplicate-id warning (warnings are errors)


async def test_the_router_wraps_the_apps_own_lifespan(migrated: DevCluster) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def own_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("app startup")
        yield {"greeting": "hello"}
        events.append("app shutdown")

    app = FastAPI(lifespan=own_lifespan)
    settings = RouterSettings(database=database_settings(migrated))
    installation = install_router(app, settings)

    @app.get("/greeting")
    async def greeting(request: Request, db: Db) -> dict[str, Any]:
        return {"greeting": request.state.greeting, "one": await db.scalar(text("SELECT 1"))}

    async with app.router.lifespan_context(app) as state:
        router = installation.provider.current
        assert router is not None and router.monitor.running  # started before the app's code
        assert events == ["app startup"] and state == {"greeting": "hello"}
    assert events == ["app startup", "app shutdown"]
    assert installation.provider.current is None and not router.monitor.running


async def test_a_bad_configuration_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "router.toml"
    bad.write_text('[database.clusters.main]\nprimary = "mysql://x@h/db"\n')
    app = FastAPI()
    install_router(app, lambda: load_settings(bad))
    with pytest.raises(ConfigError, match=r"database\.clusters\.main\.primary"):
        async with app.router.lifespan_context(app):
            pass


async def test_a_mounted_app_gets_the_router_of_the_app_it_is_mounted_in(
    router: SessionRouter,
) -> None:
    inner = FastAPI()

    @inner.get("/port")
    async def port(db: Db) -> int | None:
        return await db.scalar(text("SELECT inet_server_port()"))

    outer = installed(router)
    outer.mount("/inner", inner)
    async with client_for(outer) as client:
        response = await client.get("/inner/port")
    assert response.status_code == 200
    replica_ports = {node.url.port for node in router.default_cluster.replicas}
    assert response.json() in replica_ports


async def test_session_begin_works_in_a_route_and_commits_before_the_response(
    router: SessionRouter,
) -> None:
    app = installed(router)

    @app.post("/begin/{x}")
    async def with_begin(x: int, db: Db) -> dict[str, str]:
        async with db.begin():
            await db.execute(text("INSERT INTO deferred_check VALUES (:x)"), {"x": x})
        return {"status": "ok"}

    async with client_for(app) as client:
        response = await client.post("/begin/7101")
    assert response.status_code == 200 and "X-Consistency-Token" in response.headers
    assert await count(router, 7101) == 1


async def test_the_routed_sessionmaker_keeps_sqlalchemys_meaning(router: SessionRouter) -> None:
    app = installed(router)

    @app.post("/maker/{x}")
    async def with_maker(x: int, maker: SessionMaker) -> dict[str, str]:
        async with maker() as session:  # not committed: rolled back at the end, as in SQLAlchemy
            await session.execute(text("INSERT INTO deferred_check VALUES (:x)"), {"x": -x})
        async with maker.begin() as session:  # committed
            await session.execute(text("INSERT INTO deferred_check VALUES (:x)"), {"x": x})
        return {"status": "ok"}

    async with client_for(app) as client:
        response = await client.post("/maker/7102")
    assert response.status_code == 200 and "X-Consistency-Token" in response.headers
    assert await count(router, 7102) == 1
    assert await count(router, -7102) == 0


async def test_the_environment_prefix_is_the_hosts_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("APP_CONFIG_FILE", "test")  # the host's own variable: never read
    monkeypatch.setenv("APP_DATABASE__DEFAULT_CLUSTER", "wrong")
    monkeypatch.setenv("ROUTER_DATABASE__CLUSTERS__MAIN__PRIMARY", "postgresql://u@db/x")
    settings = load_settings(env_prefix="ROUTER_")
    assert settings.database.default_cluster == "main"
    assert settings.database.clusters["main"].primary is not None


async def test_session_options_come_from_the_settings(migrated: DevCluster) -> None:
    router = SessionRouter(database_settings(migrated, session={"expire_on_commit": True}))
    try:
        factory = router.default_cluster.primary.session_factory
        assert factory.kw["expire_on_commit"] is True
        async with router.session() as session:  # what the router's own sessions get
            assert session.sync_session.expire_on_commit is True
    finally:
        await router.dispose()


def test_a_router_from_a_closed_loop_is_rebuilt_and_one_from_a_live_loop_refused(
    migrated: DevCluster,
) -> None:
    """One event loop per test, as anyio and function-scoped pytest-asyncio give: the provider
    replaces a router whose loop has closed; a router shared with a live loop is refused with
    an error that names the cause."""
    url = migrated.url(database="app", user=APP_ROLE)
    script = f"""
import asyncio, threading
from sqlalchemy import text
from pg_session_router import EventLoopMismatchError, RouterProvider, RouterSettings

main = {{"primary": "{url}"}}
provider = RouterProvider(RouterSettings(database={{"clusters": {{"main": main}}}}))

async def one_query():
    async with provider.get().session() as session:
        return await session.scalar(text("SELECT 1"))

first = asyncio.run(one_query())            # loop 1 ends without disposing the router
second = asyncio.run(one_query())           # loop 2: a new router, not a confusing failure
print("served", first, second)

async def hold_loop_then_query(ready, done):
    await one_query()
    ready.set()
    while not done.is_set():
        await asyncio.sleep(0.01)
    await provider.dispose()

ready, done = threading.Event(), threading.Event()
worker = threading.Thread(target=asyncio.run, args=(hold_loop_then_query(ready, done),))
worker.start()
ready.wait(30)
try:
    asyncio.run(one_query())
except EventLoopMismatchError as exc:
    print("refused:", exc)
finally:
    done.set()
    worker.join()
"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PGROUTER_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "served 1 1"
    assert lines[1].startswith("refused: ") and "another event loop" in lines[1]


async def test_the_hosts_own_handlers_are_kept_and_odd_statuses_never_crash(
    router: SessionRouter,
) -> None:
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def own(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": True}, status_code=418)

    installed(router, app)

    @app.get("/n/{n}")
    async def n(n: int) -> None:
        raise HTTPException(status_code=n)

    async with client_for(app) as client:
        assert (await client.get("/n/not-a-number")).json() == {"mine": True}
        unusual = await client.get("/n/499")
        empty = await client.get("/n/204")
    assert unusual.status_code == 499 and unusual.json()["error"] == "http_error"
    assert empty.status_code == 204 and empty.content == b""
