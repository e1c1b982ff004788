"""README promises that no other test pins, over HTTP and in code: session intent by method and
by declaration, the error table, retry and replay, replica eligibility and fallback, the
configuration sources, tenant placement on a cluster of its own, an unreadable catalog, and the
engine LRU draining a busy engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.config import load_settings
from app.db.session import get_db, provider
from app.main import create_app
from pg_session_router.core.errors import ConfigError, DatabaseUnavailableError
from pg_session_router.db.driver_errors import sqlstate
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster, free_port
from pg_session_router.web import DbSession, ReadSession, WriteSession, install_router
from tests.support.faults import eventually

from .conftest import APP_ROLE, database_settings, primary_only_settings, two_slot_role

WHERE = text(
    "SELECT pg_is_in_recovery() AS replica, current_setting('transaction_read_only') AS ro, "
    "current_database() AS db"
)


pytestmark = pytest.mark.usefixtures("restore_cluster")


def client_for(asgi_app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi_app), base_url="http://test")


def app_on(router_provider: RouterProvider) -> FastAPI:
    checks = FastAPI()
    install_router(checks, provider=router_provider)
    return checks


def provider_of(router: SessionRouter) -> RouterProvider:
    own = RouterProvider()
    own.set(router)
    return own


async def where(session: AsyncSession) -> dict[str, Any]:
    row = (await session.execute(WHERE)).mappings().one()
    return {"node": session.info["node"], **row}


# -- sessions by method and by declared intent ------------------------------------------------


async def test_db_session_reads_on_get_head_options_and_writes_on_other_methods(
    router: SessionRouter,
) -> None:
    checks = app_on(provider)
    seen: dict[str, dict[str, Any]] = {}

    @checks.api_route("/where", methods=["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE"])
    async def by_method(request: Request, db: DbSession) -> dict[str, str]:
        seen[request.method] = await where(db)
        return {"method": request.method}

    async with client_for(checks) as client:
        for method in ("GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE"):
            response = await client.request(method, "/where")
            assert response.status_code == 200, (method, response.text)
    for method in ("GET", "HEAD", "OPTIONS"):
        assert seen[method]["replica"] is True, method
        assert seen[method]["node"] in {"main.replica1", "main.replica2"}
    for method in ("POST", "PUT", "DELETE"):
        assert seen[method] == {
            "node": "main.primary",
            "replica": False,
            "ro": "off",
            "db": "app",
        }, method


async def test_read_and_write_sessions_follow_the_declared_intent_not_the_method(
    router: SessionRouter, pg: DevCluster
) -> None:
    checks = app_on(provider)
    name = f"declared-{uuid.uuid4().hex[:8]}"

    @checks.post("/report")
    async def report(db: ReadSession) -> dict[str, Any]:
        return await where(db)

    @checks.get("/touch")
    async def touch(db: WriteSession) -> dict[str, Any]:
        await db.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
        return await where(db)

    async with client_for(checks) as client:
        read = (await client.post("/report")).json()
        written = (await client.get("/touch")).json()
    assert read["replica"] is True and read["node"] in {"main.replica1", "main.replica2"}
    assert written == {"node": "main.primary", "replica": False, "ro": "off", "db": "app"}
    async with router.session() as session:  # the GET's write was committed
        assert (
            await session.scalar(text("SELECT count(*) FROM items WHERE name = :n"), {"n": name})
            == 1
        )
        await session.execute(text("DELETE FROM items WHERE name = :n"), {"n": name})


# -- the error table ------------------------------------------------------------------------------


async def test_a_value_the_column_cannot_hold_is_a_400(router: SessionRouter) -> None:
    checks = app_on(provider)

    @checks.post("/store/{value}")
    async def store(value: int, db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
        # deferred_check.x is an integer column: 2**40 is out of its range (SQLSTATE 22003).
        await db.execute(
            text("INSERT INTO deferred_check VALUES (CAST(:v AS bigint))"), {"v": value}
        )
        return {"status": "stored"}

    transport = httpx.ASGITransport(app=checks, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(f"/store/{2**40}")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_value"


async def test_a_constraint_violation_is_an_integrity_error_also_at_commit(
    router: SessionRouter,
) -> None:
    with pytest.raises(IntegrityError, match="deferred_unique"):  # the COMMIT fails
        async with router.session() as session:
            await session.execute(text("INSERT INTO deferred_check VALUES (7), (7)"))
    with pytest.raises(IntegrityError, match="items_pkey"):  # the statement fails
        async with router.session() as session:
            await session.execute(text("INSERT INTO items (id, name) VALUES (-7, 'a'), (-7, 'b')"))
    async with router.session() as session:
        assert await session.scalar(text("SELECT count(*) FROM deferred_check WHERE x = 7")) == 0


def assert_503(response: httpx.Response, *errors: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"].isdigit()
    assert response.json()["error"] in errors


async def test_unavailable_databases_are_503_with_retry_after(migrated: DevCluster) -> None:
    pg = migrated
    closed = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{free_port()}/app"
    no_primary = SessionRouter(
        database_settings(
            pg, clusters={"main": {"primary": closed}}, tenants={}, retry={"deadline": 0.3}
        )
    )
    no_replica = SessionRouter(
        database_settings(
            pg, replicas=False, routing={"fallback_to_primary": False}, retry={"deadline": 0.3}
        )
    )
    topology = SessionRouter(database_settings(pg, retry={"deadline": 0.3}))
    try:
        down = app_on(provider_of(no_primary))

        @down.post("/write")
        async def write(db: DbSession) -> dict[str, str]:
            await db.execute(text("INSERT INTO items (name) VALUES ('nowhere')"))
            return {"status": "written"}

        no_fallback = app_on(provider_of(no_replica))

        @no_fallback.get("/read")
        async def read(db: DbSession) -> dict[str, str]:
            return {"status": "read"}

        changed = app_on(provider_of(topology))

        @changed.post("/misrouted")
        async def misrouted() -> dict[str, str]:
            target = Target(node="main.replica1", intent="write")
            async with topology.session(target) as session:
                await session.execute(text("INSERT INTO items (name) VALUES ('misrouted')"))
            return {"status": "written"}

        async with client_for(down) as client:
            assert_503(await client.post("/write"), "database_unavailable", "no_node_available")
        async with client_for(no_fallback) as client:
            assert_503(await client.get("/read"), "database_unavailable", "no_node_available")
        async with client_for(changed) as client:
            assert_503(await client.post("/misrouted"), "topology_changed")
    finally:
        for router in (no_primary, no_replica, topology):
            await router.dispose()


# -- retry and replay ------------------------------------------------------------------------------


async def test_too_many_connections_is_retried_until_a_slot_frees(migrated: DevCluster) -> None:
    """SQLSTATE 53300: the server is alive but full. Opening a session retries (without ejecting
    the server) and succeeds once a connection slot frees up."""
    pg = migrated
    role, url = two_slot_role(pg, "limited")
    routers: list[SessionRouter] = []
    hog: asyncpg.Connection | None = None

    def limited_router(deadline: float) -> SessionRouter:
        routers.append(SessionRouter(primary_only_settings(pg, url, retry={"deadline": deadline})))
        return routers[-1]

    try:
        quick = limited_router(0.3)
        await quick.start()  # its probe connection takes the first slot
        hog = await asyncpg.connect(url.replace("+asyncpg", ""))  # and this one the second
        with pytest.raises(DatabaseUnavailableError) as refused:
            async with quick.session() as session:  # checks out on its first statement
                await session.execute(text("SELECT 1"))
        assert sqlstate(refused.value.last_error) == "53300"  # type: ignore[arg-type]
        assert quick.status()["nodes"]["main.primary"]["state"] == "up"  # busy is not dead
        await quick.dispose()

        patient = limited_router(10.0)
        await patient.start()

        async def free_a_slot_later() -> None:
            await asyncio.sleep(0.5)  # the fault lasts this long; nothing waits on a guess
            assert hog is not None
            await hog.close()

        started = time.monotonic()
        freeing = asyncio.create_task(free_a_slot_later())
        async with patient.session() as session:
            assert await session.scalar(text("SELECT 1")) == 1
        await freeing
        assert time.monotonic() - started >= 0.5  # it waited for the slot: it was retried
        assert patient.status()["nodes"]["main.primary"]["state"] == "up"
    finally:
        if hog is not None and not hog.is_closed():
            await hog.close()
        for router in routers:
            await router.dispose()
        pg.sql("primary", f"DROP ROLE IF EXISTS {role}")


RAISE_40001 = text("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")


async def test_run_replays_a_read_that_hit_a_recovery_conflict(router: SessionRouter) -> None:
    attempts: list[str] = []

    async def read(session: AsyncSession) -> bool:
        attempts.append(session.info["node"])
        if len(attempts) == 1:
            await session.execute(RAISE_40001)  # what a replica's recovery conflict raises
        return bool(await session.scalar(text("SELECT pg_is_in_recovery()")))

    assert await router.run(read, "replica") is True
    assert len(attempts) == 2
    assert set(attempts) <= {"main.replica1", "main.replica2"}

    with pytest.raises(DBAPIError) as plain:  # a plain session is never replayed
        async with router.session("replica") as session:
            await session.execute(RAISE_40001)
    assert sqlstate(plain.value) == "40001"


# -- replica eligibility and fallback -------------------------------------------------------------


async def test_a_replica_that_lacks_no_commit_keeps_its_reads_after_the_primary_was_quiet(
    migrated: DevCluster,
) -> None:
    """WAL that carries no commit (a checkpoint) reaches a replica after a quiet spell: until
    it is replayed, the server's own figure (seconds since the last transaction it replayed) is
    the length of the quiet spell. The replica lacks no commit, so it keeps its reads; while its
    replay stays paused it goes stale once it has been behind for longer than the limit."""
    pg, limit = migrated, 4.0
    router = SessionRouter(
        database_settings(
            pg, routing={"max_replica_lag_seconds": limit, "max_replica_lag_bytes": None}
        )
    )

    def state() -> dict[str, Any]:
        return dict(router.status()["nodes"]["main.replica1"])

    try:
        await router.start()
        health = router.node("main.replica1").health
        async with router.session() as session:
            await session.execute(text("INSERT INTO items (name) VALUES ('before the quiet')"))
        await asyncio.to_thread(pg.wait_replayed)
        await asyncio.sleep(limit + 1)  # the quiet spell itself: no commit for this long
        await asyncio.to_thread(pg.pause_replay, "replica1")
        written = await asyncio.to_thread(
            pg.sql, "primary", "CHECKPOINT; SELECT pg_current_wal_lsn()"
        )
        received = f"SELECT pg_last_wal_receive_lsn() >= '{written}'::pg_lsn"
        await eventually(
            lambda: pg.sql("replica1", received) == "t", within=10, what="checkpoint received"
        )
        # Three probes of the replica: the last one's round began after the checkpoint.
        probes = health.probes
        await eventually(lambda: health.probes >= probes + 3, within=5, what="three probes")
        seen = state()
        assert seen["lag_bytes"] > 0, seen  # behind, by WAL without a commit
        assert seen["fresh"] is True and seen["lag_seconds"] < limit, seen
        await eventually(
            lambda: not state()["fresh"], within=limit + 5, what="stale while replay is paused"
        )
        await asyncio.to_thread(pg.resume_replay, "replica1")
        await eventually(lambda: state()["fresh"], within=10, what="fresh once replayed")
    finally:
        await asyncio.to_thread(pg.resume_replay, "replica1")
        await router.dispose()


async def test_replicas_behind_max_replica_lag_seconds_get_no_reads_the_primary_serves_them(
    migrated: DevCluster,
) -> None:
    pg = migrated
    router = SessionRouter(
        database_settings(
            pg, routing={"max_replica_lag_seconds": 1.0, "max_replica_lag_bytes": None}
        )
    )
    try:
        await router.start()
        for replica in pg.replicas:
            await asyncio.to_thread(pg.pause_replay, replica.name)
        async with router.session() as session:  # WAL the replicas receive but do not replay
            await session.execute(text("INSERT INTO items (name) VALUES ('lag-seconds')"))

        def lagging(name: str) -> bool:
            state = router.status()["nodes"][name]
            return not state["fresh"] and state["lag_seconds"] > 1.0

        await eventually(
            lambda: lagging("main.replica1") and lagging("main.replica2"),
            within=10,
            what="both replicas more than a second behind",
        )
        for _ in range(10):
            async with router.session("replica") as session:
                assert await where(session) == {
                    "node": "main.primary",
                    "replica": False,
                    "ro": "on",  # the fallback read runs READ ONLY
                    "db": "app",
                }

        for replica in pg.replicas:
            await asyncio.to_thread(pg.resume_replay, replica.name)
        await eventually(
            lambda: not lagging("main.replica1") and not lagging("main.replica2"),
            within=10,
            what="the replicas caught up",
        )
        async with router.session("replica") as session:
            assert (await where(session))["replica"] is True
    finally:
        async with router.session() as session:
            await session.execute(text("DELETE FROM items WHERE name = 'lag-seconds'"))
        await router.dispose()


# -- configuration ------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working directory of its own and no APP_ variables from outside."""
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("APP_"):
            monkeypatch.delenv(name)
    return tmp_path


def test_a_dotenv_file_is_read_between_the_environment_and_the_toml_file(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = clean_environment / "settings.toml"
    toml.write_text(
        "[database]\nconnect_timeout = 4.5\n"
        '[database.clusters.main]\nprimary = "postgresql://app@from-toml:5432/app"\n'
    )
    (clean_environment / ".env").write_text(
        "APP_DATABASE__CLUSTERS__MAIN__PRIMARY=postgresql://app@from-dotenv:5432/app\n"
        "APP_DATABASE__CLUSTERS__MAIN__POOL__SIZE=7\n"
        "APP_DATABASE__RETRY__DEADLINE=9\n"
    )
    monkeypatch.setenv("APP_CONFIG_FILE", str(toml))
    monkeypatch.setenv("APP_DATABASE__RETRY__DEADLINE", "4")
    database = load_settings().database
    main = database.clusters["main"]
    assert "from-dotenv" in str(main.primary)  # .env over the TOML file
    assert main.pool.size == 7
    assert database.connect_timeout == 4.5  # the TOML file still counts
    assert database.retry.deadline == 4  # the environment over .env


async def test_bad_configuration_fails_when_the_app_starts(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_DATABASE__CLUSTERS__MAIN__PRIMARY", "not a url")
    application = create_app(RouterProvider(load_settings))  # building the app reads nothing
    with pytest.raises(ConfigError, match=r"database\.clusters\.main\.primary"):
        async with application.router.lifespan_context(application):
            pass


# -- tenants ------------------------------------------------------------------------------------


async def test_a_database_tenant_with_only_a_cluster_uses_that_cluster(
    migrated: DevCluster,
) -> None:
    pg = migrated
    acme_cluster = {
        "primary": pg.url(database="acme", user=APP_ROLE),
        "replicas": [pg.url(node.name, database="acme", user=APP_ROLE) for node in pg.replicas],
    }
    settings = database_settings(
        pg, tenants={"acme-own": {"strategy": "database", "cluster": "acme_cluster"}}
    )
    clusters = {
        **settings.clusters,
        "acme_cluster": type(settings.clusters["main"]).model_validate(acme_cluster),
    }
    router = SessionRouter(settings.model_copy(update={"clusters": clusters}))
    try:
        await router.start()
        async with router.session(tenant="acme-own") as session:
            assert await where(session) == {
                "node": "acme_cluster.primary",
                "replica": False,
                "ro": "off",
                "db": "acme",
            }
        async with router.session(tenant="acme-own", read_only=True) as session:
            placed = await where(session)
        assert placed["replica"] is True and placed["db"] == "acme"
        assert placed["node"] in {"acme_cluster.replica1", "acme_cluster.replica2"}
    finally:
        await router.dispose()


async def test_an_unreadable_catalog_is_a_503_for_unknown_ids_never_a_default(
    router: SessionRouter, pg: DevCluster
) -> None:
    from app.main import app

    pg.sql("primary", f"REVOKE SELECT ON tenants FROM {APP_ROLE}", database="app")
    try:
        await router.tenants.refresh()  # the next reload (the TTL's, or a push) fails
        async with client_for(app) as client:
            unknown = await client.get("/items", headers={"X-Tenant-ID": "nobody-knows-me"})
            assert_503(unknown, "database_unavailable")
            known = await client.get("/items?limit=1", headers={"X-Tenant-ID": "initech"})
            assert known.status_code == 200  # configured tenants need no catalog
    finally:
        pg.sql("primary", f"GRANT SELECT ON tenants TO {APP_ROLE}", database="app")
    catalog = router.tenants.catalog
    assert catalog is not None and catalog.loads >= 1


async def test_a_full_engine_lru_drains_a_busy_engine_for_a_new_tenant(
    migrated: DevCluster,
) -> None:
    """Two engines allowed, both busy: a third tenant's session waits until the least recently
    used one has no session left, then gets its engine. Nobody fails, the bound holds."""
    pg = migrated
    pg.create_database("lru_c", owner=APP_ROLE)
    tenants = {
        name: {"strategy": "database", "url": pg.url(database=database, user=APP_ROLE)}
        for name, database in (("lru-a", "acme"), ("lru-b", "umbrella"), ("lru-c", "lru_c"))
    }
    router = SessionRouter(
        database_settings(
            pg,
            tenants=tenants,
            tenancy={"max_engines": 2, "pool": {"size": 1, "max_overflow": 0, "timeout": 10}},
        )
    )
    events: dict[str, float] = {}
    max_engines_seen = 0
    busy = {name: asyncio.Event() for name in ("lru-a", "lru-b")}

    async def hold(tenant: str) -> None:
        async with router.session(tenant=tenant) as session:
            await session.execute(text("SELECT 1"))
            busy[tenant].set()
            await session.execute(text("SELECT pg_sleep(0.5)"))
        events[f"{tenant} ended"] = time.monotonic()

    async def newcomer() -> str:
        async with router.session(tenant="lru-c") as session:
            events["lru-c entered"] = time.monotonic()
            return str(await session.scalar(text("SELECT current_database()")))

    async def watch(stop: asyncio.Event) -> None:
        nonlocal max_engines_seen
        while not stop.is_set():
            max_engines_seen = max(max_engines_seen, router.tenant_clusters.engines)
            await asyncio.sleep(0.005)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    try:
        await router.start()
        first = asyncio.create_task(hold("lru-a"))
        await busy["lru-a"].wait()
        second = asyncio.create_task(hold("lru-b"))
        await busy["lru-b"].wait()
        assert router.tenant_clusters.engines == 2
        database = await newcomer()
        await asyncio.gather(first, second)
    finally:
        stop.set()
        await watcher
        engines = router.tenant_clusters.engines
        await router.dispose()
        pg.sql("primary", "DROP DATABASE lru_c")
    assert database == "lru_c"
    assert events["lru-c entered"] >= events["lru-a ended"]  # it waited for the drain
    assert max_engines_seen <= 2 and engines <= 2
