"""Planned maintenance: a drained replica costs no read and ends with its pool closed; a drain
that gives up waiting leaves no connection to the drained server; a connect under way when a
pool is closed counts in use until it fails; a primary switchover with a
drain pauses writes instead of failing them; the admin endpoint is for the admin token only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.main import create_app
from pg_session_router.core.errors import TargetError
from pg_session_router.core.settings import DatabaseSettings, HttpSettings, RouterSettings
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import APP_ROLE, HEALTH_INTERVAL, database_settings, notes_cluster
from tests.support.faults import BlackholeServer, eventually

ADMIN_TOKEN = "a" * 40


@dataclass
class Traffic:
    reads: int = 0
    writes: int = 0
    nodes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    slowest_write: float = 0.0


async def readers(router: SessionRouter, traffic: Traffic, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with router.session("replica") as session:
                await session.scalar(text("SELECT 1"))
            traffic.reads += 1
            traffic.nodes.append(session.info["node"])
        except Exception as exc:
            traffic.errors.append(f"read: {exc!r}")
        await asyncio.sleep(0.002)


async def writers(router: SessionRouter, traffic: Traffic, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        try:
            async with router.session() as session:
                await session.execute(text("INSERT INTO notes (body) VALUES ('x')"))
            traffic.writes += 1
            traffic.slowest_write = max(traffic.slowest_write, loop.time() - started)
        except Exception as exc:
            traffic.errors.append(f"write: {exc!r}")
        await asyncio.sleep(0.005)


def router_connections(pg: DevCluster, node: str) -> int:
    return int(
        pg.sql(
            node,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name LIKE 'session-router:main.%' "
            "AND application_name <> 'session-router:health'",
        )
    )


def in_use(router: SessionRouter, node: str) -> int:
    return int(router.status()["nodes"][node]["pool"]["in_use"])


@pytest.fixture
async def router(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    router = SessionRouter(database_settings(migrated))
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


async def test_a_drained_replica_costs_no_read_and_ends_with_its_pool_closed(
    router: SessionRouter, migrated: DevCluster
) -> None:
    traffic, stop = Traffic(), asyncio.Event()
    tasks = [asyncio.create_task(readers(router, traffic, stop)) for _ in range(6)]
    try:
        await eventually(lambda: "main.replica1" in traffic.nodes, within=5, what="reads there")
        report = await router.drain("main.replica1", within=5)
        assert "main.replica1" in report.nodes and report.sessions_left == 0
        after = len(traffic.nodes)
        await eventually(lambda: len(traffic.nodes) > after + 50, within=5, what="more reads")
        assert "main.replica1" not in traffic.nodes[after:]
        assert router.status()["nodes"]["main.replica1"]["drained"] is True
        await eventually(
            lambda: router_connections(migrated, "replica1") == 0, within=5, what="pool closed"
        )
        with pytest.raises(TargetError, match="drained"):
            async with router.session("main.replica1"):
                pass
        router.undrain("main.replica1")
        back = len(traffic.nodes)
        await eventually(
            lambda: "main.replica1" in traffic.nodes[back:], within=5, what="reads back there"
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert traffic.errors == []


async def test_a_drain_that_gives_up_leaves_no_connection_to_the_drained_server(
    migrated: DevCluster,
) -> None:
    """The drain stops waiting while one session holds the replica's only pooled connection
    and another waits in line for it. The one in line is served by another node at once, not
    by a new connection to the drained server; the held connection is shown in use until its
    session ends, and closes then. (A pool SQLAlchemy has disposed keeps both open until the
    garbage collector finds them.)"""
    main = {
        "primary": migrated.url(database="app", user=APP_ROLE),
        "replicas": [migrated.url("replica1", database="app", user=APP_ROLE)],
        "pool": {"size": 1, "max_overflow": 0, "timeout": 10},
    }
    router = SessionRouter(database_settings(migrated, clusters={"main": main}))
    await router.start()
    who = text("SELECT inet_server_port()")

    async def in_line() -> int:
        async with router.session(read_only=True) as waiting:
            return int(await waiting.scalar(who))

    try:
        async with router.session(read_only=True) as holding:
            assert await holding.scalar(who) == migrated.nodes["replica1"].port
            waiter = asyncio.create_task(in_line())
            pool: Any = router.node("main.replica1").engine.pool
            await eventually(lambda: len(pool._waiters) == 1, within=5, what="one in line")
            report = await router.drain("main.replica1", within=0.2)
            assert report.sessions_left == 2
            assert not pool._waiters  # woken by the drain, not by its own next look
            assert await asyncio.wait_for(waiter, timeout=5) == migrated.primary.port
            assert in_use(router, "main.replica1") == 1
        assert in_use(router, "main.replica1") == 0
        await eventually(
            lambda: router_connections(migrated, "replica1") == 0, within=5, what="none left"
        )
    finally:
        await router.dispose()


async def test_a_connect_under_way_when_its_pool_is_closed_counts_in_use_until_it_fails(
    migrated: DevCluster,
) -> None:
    """A node's pool is closed (a drain, an evicted tenant engine) while a checkout is still
    connecting to a server that never answers: the node counts that connection in use, and
    stops counting it when the connect fails (never for good, which would steer
    `least_in_use` away from the node after `undrain`)."""
    async with BlackholeServer() as blackhole:  # accepts, never answers
        silent = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{blackhole.port}/app"
        main = {"primary": migrated.url(database="app", user=APP_ROLE), "replicas": [silent]}
        router = SessionRouter(
            database_settings(migrated, clusters={"main": main}, connect_timeout=2.0)
        )
        await router.start()
        node = router.node("main.replica1")

        async def check_out() -> None:
            async with node.engine.connect():
                pass

        try:
            connecting = asyncio.create_task(check_out())
            await eventually(lambda: node.in_use() == 1, within=5, what="a connect under way")
            await node.dispose()
            assert node.in_use() == 1
            with pytest.raises(OSError):  # asyncpg's connect timeout, unwrapped
                await connecting
            assert node.in_use() == 0
        finally:
            await router.dispose()


@pytest.fixture(scope="module")
def switchable() -> Iterator[DevCluster]:
    with notes_cluster(2) as cluster:
        yield cluster


async def test_a_primary_switchover_with_a_drain_pauses_writes_and_fails_no_read(
    switchable: DevCluster,
) -> None:
    nodes = [switchable.url(name, database="app", user=APP_ROLE) for name in switchable.nodes]
    settings: dict[str, Any] = {
        "connect_timeout": 1.0,
        "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
        "retry": {"deadline": 20.0},
        "clusters": {"main": {"nodes": nodes}},  # roles discovered by the monitor
    }
    router = SessionRouter(DatabaseSettings.model_validate(settings))
    await router.start()
    traffic, stop = Traffic(), asyncio.Event()
    tasks = [
        *(asyncio.create_task(readers(router, traffic, stop)) for _ in range(4)),
        *(asyncio.create_task(writers(router, traffic, stop)) for _ in range(2)),
    ]
    try:
        await eventually(lambda: traffic.writes > 20, within=10, what="writes before")
        report = await router.drain("main.node1", within=5)  # the primary
        assert report.sessions_left == 0
        # In threads: the writers keep running (and must wait) while the old primary stops
        # and the new one is promoted. Called on the loop, they froze it instead, and a
        # write could start only after the monitor had already found the new primary.
        await asyncio.to_thread(switchable.stop_node, "primary", mode="fast")
        await asyncio.to_thread(switchable.promote, "replica1")
        before = traffic.writes
        await eventually(lambda: traffic.writes > before + 20, within=20, what="writes resumed")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await router.dispose()
    assert traffic.errors == []
    assert traffic.slowest_write > 0.1  # writes waited for the new primary, none failed


def admin_app(pg: DevCluster, **http: Any) -> Any:
    settings = RouterSettings(database=database_settings(pg), http=HttpSettings(**http))
    return create_app(provider=RouterProvider(settings))


async def post(app: Any, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, headers=headers)


async def test_the_admin_endpoint_is_for_the_admin_token_only(migrated: DevCluster) -> None:
    path = "/admin/nodes/main.replica2/drain?within=1"
    assert (await post(admin_app(migrated), path, ADMIN_TOKEN)).status_code == 404  # not set
    public = admin_app(migrated, health_details_public=True, admin_token=ADMIN_TOKEN)
    assert (await post(public, path)).status_code == 401  # seeing is not changing
    assert (await post(public, path, "b" * 40)).status_code == 401
    unknown = await post(public, "/admin/nodes/nowhere.primary/drain", ADMIN_TOKEN)
    assert unknown.status_code == 404 and "nowhere" not in unknown.text
    drained = await post(public, path, ADMIN_TOKEN)
    assert drained.status_code == 200, drained.text
    assert drained.json()["drained"]["nodes"] == ["main.replica2"]
    undrained = await post(public, "/admin/nodes/main.replica2/undrain", ADMIN_TOKEN)
    assert undrained.json() == {"undrained": ["main.replica2"]}
