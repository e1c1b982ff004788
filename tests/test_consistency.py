"""Read-your-writes by WAL position: a write's token makes the next read see it, even when
every replica is behind; a read without a token goes to the replicas as usual."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy import text

from app.db.session import set_router
from app.main import app, create_app
from app.models import Item
from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster
from pg_session_router.testing import paused_replay
from tests.support.faults import eventually

from .conftest import HEALTH_INTERVAL, database_settings


@pytest.fixture
async def patient_router(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    """Replicas stay eligible however long their replay is paused (lag limits off), so only
    the token can keep a read away from them."""
    router = SessionRouter(
        database_settings(
            migrated, routing={"max_replica_lag_seconds": None, "max_replica_lag_bytes": None}
        )
    )
    await router.start()
    set_router(router)
    try:
        yield router
    finally:
        set_router(None)
        await router.dispose()


@pytest.fixture
def paused_replicas(pg: DevCluster) -> Iterator[None]:
    with paused_replay(pg):  # the test kit's helper, as host apps use it
        yield


async def test_a_read_with_the_write_token_sees_the_write_while_replicas_lag(
    patient_router: SessionRouter, paused_replicas: None
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        headers = {"X-Tenant-ID": "acme"}
        created = await client.post("/items", json={"name": "fresh"}, headers=headers)
        assert created.status_code == 201
        token = created.headers["X-Consistency-Token"]
        assert ConsistencyToken.parse(token).stream == "main"
        path = f"/items/{created.json()['id']}"

        stale = await client.get(path, headers=headers)  # replicas are paused before the write
        assert stale.status_code == 404
        fresh = await client.get(path, headers={**headers, "X-Consistency-Token": token})
        assert fresh.status_code == 200 and fresh.json()["name"] == "fresh"


async def test_a_unit_of_work_that_commits_itself_still_gets_its_token(
    patient_router: SessionRouter, paused_replicas: None
) -> None:
    async with patient_router.session(consistency_token=True) as session:
        item = Item(name="committed-by-caller")
        session.add(item)
        await session.commit()
    token = session.info["consistency_token"]
    async with patient_router.session(Target(intent="read", after=token)) as session:
        assert await session.get(Item, item.id) is not None  # replicas are paused: the primary


async def test_reads_return_to_replicas_once_they_have_replayed_the_token(
    patient_router: SessionRouter, pg: DevCluster
) -> None:
    router = patient_router
    async with router.session() as session:
        await session.execute(text("SELECT txid_current()"))  # a write: WAL moves on
    token = await router.consistency_token(router.default_cluster)
    target = Target(intent="read", after=token)
    await eventually(
        lambda: router.route(target).node.role == "replica",
        within=3 * HEALTH_INTERVAL + 1,
        what="replicas to pass the token",
    )
    other_stream = Target(intent="read", after=ConsistencyToken("elsewhere", 10**15))
    assert router.route(other_stream).node.role == "replica"  # not this cluster's WAL


@pytest.mark.parametrize("token", ["", "main", "main/-1", "main/abc", "x" * 300, "main/1/2"])
async def test_a_malformed_token_is_a_400(patient_router: SessionRouter, token: str) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        response = await client.get(
            "/items", headers={"X-Tenant-ID": "acme", "X-Consistency-Token": token}
        )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_consistency_token"


async def test_no_token_without_the_setting(router: SessionRouter) -> None:
    provider = RouterProvider(RouterSettings(http=HttpSettings(consistency_tokens=False)))
    provider.set(router)
    untracked = create_app(provider)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=untracked), base_url="http://test"
    ) as client:
        response = await client.post(
            "/items", json={"name": "untracked"}, headers={"X-Tenant-ID": "acme"}
        )
    assert response.status_code == 201
    assert "X-Consistency-Token" not in response.headers
