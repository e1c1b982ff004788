"""Read-your-writes that follows the work everywhere: a bounded wait on replicas, browsers
(cookie), clients that echo nothing (server-side memory), background jobs (`after=`), and no
stale read under a lagging replica."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.main import create_app
from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.events import RouterObserver
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.testing import paused_replay
from tests.conftest import database_settings

TENANT = {"X-Tenant-ID": "globex"}


async def write_item(router: SessionRouter, name: str) -> str:
    async with router.session(tenant="globex", consistency_token=True) as session:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
    return str(session.info["consistency_token"])


async def read_item(router: SessionRouter, name: str, **kw: Any) -> tuple[bool, str, str]:
    async with router.session(tenant="globex", read_only=True, **kw) as session:
        found = await session.scalar(
            text("SELECT count(*) FROM items WHERE name = :n"), {"n": name}
        )
    return bool(found), session.info["node"], session.info["route_reason"]


@pytest.fixture
async def waiting_router(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    settings = database_settings(migrated, routing={"max_wait_for_replica": 2.0})
    router = SessionRouter(settings)
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


@pytest.mark.usefixtures("restore_cluster")
async def test_a_token_read_waits_for_a_replica_that_catches_up(
    waiting_router: SessionRouter, migrated: DevCluster
) -> None:
    name = f"waited-{uuid.uuid4().hex[:8]}"
    with paused_replay(migrated):
        token = await write_item(waiting_router, name)
        await waiting_router.monitor.probe_round()  # the router knows the replicas are behind

        async def resume_soon() -> None:
            await asyncio.sleep(0.1)
            for node in migrated.replicas:
                await asyncio.to_thread(migrated.resume_replay, node.name)

        resumer = asyncio.create_task(resume_soon())
        found, node, reason = await read_item(waiting_router, name, after=token)
        await resumer
    assert found and reason == "consistency-token-waited" and ".replica" in node
    # Counted on the node it ended on, and no longer (what a drain of a server waits for).
    in_flight = {n.name: n.in_flight for c in waiting_router.clusters.values() for n in c.nodes}
    assert set(in_flight.values()) == {0}, in_flight


@pytest.mark.usefixtures("restore_cluster")
async def test_a_token_read_that_waits_in_vain_goes_to_the_primary(
    migrated: DevCluster,
) -> None:
    router = SessionRouter(database_settings(migrated, routing={"max_wait_for_replica": 0.2}))
    name = f"in-vain-{uuid.uuid4().hex[:8]}"
    try:
        await router.start()
        with paused_replay(migrated):
            token = await write_item(router, name)
            await router.monitor.probe_round()
            started = time.monotonic()
            found, node, reason = await read_item(router, name, after=token)
            waited = time.monotonic() - started
    finally:
        await router.dispose()
    assert found and node == "main.primary" and reason == "consistency-token"
    assert 0.2 <= waited < 2.0  # waited its bound, then the primary answered


async def test_a_background_job_reads_what_its_request_wrote(
    router: SessionRouter, migrated: DevCluster
) -> None:
    name = f"job-{uuid.uuid4().hex[:8]}"
    with paused_replay(migrated):
        token = await write_item(router, name)  # the request: enqueue `token` with the job
        found_without, _, _ = await read_item(router, name)
        found, node, _ = await read_item(router, name, after=token)  # the worker
    assert not found_without  # a replica that has not replayed: the job would miss its row
    assert found and node == "main.primary"


def http_app(pg: DevCluster, **http: Any) -> FastAPI:
    settings = RouterSettings(database=database_settings(pg), http=HttpSettings(**http))
    return create_app(provider=RouterProvider(settings))


async def post_then_get(app: FastAPI, pg: DevCluster, **client: Any) -> tuple[int, bool]:
    """POST an item, then GET it by id with replay paused; echo nothing by hand."""
    name = f"plain-{uuid.uuid4().hex[:8]}"
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", **client) as c:
            with paused_replay(pg):
                created = await c.post("/items", json={"name": name}, headers=TENANT)
                fetched = await c.get(f"/items/{created.json()['id']}", headers=TENANT)
    return created.status_code, fetched.status_code == 200


@pytest.mark.usefixtures("restore_cluster")
async def test_without_help_a_plain_post_then_get_misses_its_row(migrated: DevCluster) -> None:
    assert await post_then_get(http_app(migrated), migrated) == (201, False)


@pytest.mark.usefixtures("restore_cluster")
async def test_server_side_memory_lets_a_plain_post_then_get_read_its_row(
    migrated: DevCluster,
) -> None:
    app = http_app(migrated, consistency_memory="tenant")
    assert await post_then_get(app, migrated) == (201, True)


@pytest.mark.usefixtures("restore_cluster")
async def test_the_cookie_carries_the_token_for_browsers(migrated: DevCluster) -> None:
    app = http_app(migrated, consistency_cookie=True)
    assert await post_then_get(app, migrated) == (201, True)  # httpx keeps cookies, like a browser


async def test_a_malformed_cookie_is_ignored_not_a_400(migrated: DevCluster) -> None:
    app = http_app(migrated, consistency_cookie=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            c.cookies.set("pgrouter-consistency", "garbage")
            assert (await c.get("/items", headers=TENANT)).status_code == 200
            bad_header = await c.get("/items", headers={**TENANT, "X-Consistency-Token": "garbage"})
            beyond_wal = await c.get(
                "/items", headers={**TENANT, "X-Consistency-Token": "main/99999999999999999999"}
            )
    assert bad_header.status_code == 400  # a header is the client's own doing
    assert beyond_wal.status_code == 400  # no 64-bit WAL position is that far


@pytest.mark.usefixtures("restore_cluster")
async def test_a_thousand_write_then_read_cycles_with_a_lagging_replica_read_no_stale_row(
    waiting_router: SessionRouter, migrated: DevCluster
) -> None:
    migrated.pause_replay("replica1")  # one replica lags more and more; the other keeps up
    stale = 0
    served_by: dict[str, int] = {}

    async def cycle(n: int) -> None:
        nonlocal stale
        name = f"cycle-{uuid.uuid4().hex[:6]}-{n}"
        token = await write_item(waiting_router, name)
        found, node, _ = await read_item(waiting_router, name, after=token)
        stale += not found
        served_by[node] = served_by.get(node, 0) + 1

    try:
        for batch in range(100):
            await asyncio.gather(*(cycle(batch * 10 + n) for n in range(10)))
    finally:
        migrated.resume_replay("replica1")
        migrated.wait_replayed()
    assert stale == 0
    assert served_by.get("main.replica2", 0) > 0  # replicas did serve: not all primary


async def test_an_observer_that_raises_never_fails_a_unit_of_work(
    router: SessionRouter, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(RouterObserver):
        def session_opened(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

        def session_ended(self, *args: Any) -> None:
            raise RuntimeError("observer bug")

    broken = Broken()
    router.events.subscribe(broken)
    name = f"observed-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(3):
            token = await write_item(router, name)
        found, _, _ = await read_item(router, name, after=token)
    finally:
        router.events.unsubscribe(broken)
    assert found  # committed, and read back
    failures = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(failures) == 2  # once per observer and event, not per session
    in_use = sum(n.pool_status()["in_use"] for n in router.clusters["main"].nodes)
    assert in_use == 0  # nothing leaked


async def post_here_get_there(pg: DevCluster, memory: str) -> bool:
    """Two app processes (two apps, each its own router and memory) on the same databases:
    a POST to one, then a plain GET of the same tenant from the other, replay paused."""
    name = f"shared-{uuid.uuid4().hex[:8]}"
    here, there = (http_app(pg, consistency_memory=memory) for _ in range(2))
    async with here.router.lifespan_context(here), there.router.lifespan_context(there):
        post = httpx.AsyncClient(transport=httpx.ASGITransport(app=here), base_url="http://a")
        get = httpx.AsyncClient(transport=httpx.ASGITransport(app=there), base_url="http://b")
        async with post, get:
            with paused_replay(pg):
                created = await post.post("/items", json={"name": name}, headers=TENANT)
                fetched = await get.get(f"/items/{created.json()['id']}", headers=TENANT)
    return fetched.status_code == 200  # 404: the read missed the write


@pytest.mark.usefixtures("restore_cluster")
async def test_shared_memory_lets_another_process_read_the_write(migrated: DevCluster) -> None:
    assert await post_here_get_there(migrated, "shared")
    assert not await post_here_get_there(migrated, "tenant")  # per process: the limit


async def test_the_example_job_counts_the_item_its_request_added(
    router: SessionRouter, migrated: DevCluster
) -> None:
    from app.jobs import add_item_and_enqueue, count_items_job

    with paused_replay(migrated):
        _, token = await add_item_and_enqueue("globex", f"job-{uuid.uuid4().hex[:8]}")
        async with router.session(tenant="globex", target="primary") as session:
            on_primary = await session.scalar(text("SELECT count(*) FROM items"))
        assert await count_items_job("globex", after=token) == on_primary
