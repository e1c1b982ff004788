"""The health monitor and the circuit breaker: probing cost, backoff, status, policies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.main import create_app
from pg_session_router.core.settings import (
    HealthSettings,
    HttpSettings,
    RouterSettings,
    RoutingSettings,
)
from pg_session_router.db.health import HealthMonitor, ServerHealth
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.faults import ReadLoad, eventually

from .conftest import HEALTH_INTERVAL, database_settings

WHO = text("SELECT inet_server_port()")


async def test_one_probe_connection_per_server_and_none_from_the_pools(
    router: SessionRouter, pg: DevCluster
) -> None:
    async with ReadLoad(router, tasks=20) as load:
        probes_before = {n: s.probes for n, s in router.monitor.servers.items()}
        started = time.monotonic()
        await asyncio.sleep(6 * HEALTH_INTERVAL)
        elapsed = time.monotonic() - started
    assert load.failures == [] and load.total > 100
    rounds = elapsed / HEALTH_INTERVAL
    for endpoint, server in router.monitor.servers.items():
        probes = server.probes - probes_before[endpoint]
        assert rounds - 2 <= probes <= rounds + 1, (endpoint, probes, rounds)
    count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'session-router:health'"
    for node in pg.nodes:
        assert await asyncio.to_thread(pg.sql, node, count) == "1"


async def test_an_ejection_is_logged_once_not_per_request(
    router: SessionRouter, pg: DevCluster, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = f"127.0.0.1:{pg.nodes['replica2'].port}"
    caplog.set_level(logging.WARNING, logger="pg_session_router.db.health")
    try:
        async with ReadLoad(router, tasks=20) as load:
            await eventually(lambda: load.total > 50, within=5, what="reads")
            await asyncio.to_thread(pg.stop_node, "replica2")
            await eventually(
                lambda: not router.monitor.servers[endpoint].up, within=2, what="ejection"
            )
            before = load.total
            await eventually(lambda: load.total > before + 300, within=5, what="more reads")
        assert load.failures == []
    finally:
        await asyncio.to_thread(pg.start_node, "replica2")
        await asyncio.to_thread(pg.wait_streaming)
    ejections = [r for r in caplog.records if r.getMessage().startswith(f"ejected {endpoint}")]
    assert len(ejections) == 1


def test_a_flapping_server_waits_longer_before_each_trial() -> None:
    from sqlalchemy.engine import make_url

    health = ServerHealth(
        "db:5432",
        make_url("postgresql+asyncpg://u@db/x"),
        HealthSettings(interval=1.0, max_backoff=4.0),
    )
    waits = []
    for _ in range(5):
        health.eject("refused")
        waits.append(round(health.retry_at - time.monotonic()))
        assert not health.up and not health.probe_due(time.monotonic())
        health.admit()
        assert health.up
    assert waits == [1, 2, 4, 4, 4]


def probe_row(*, lsn: int, timeline: int | None, recovery: bool = True, **row: Any) -> Any:
    """What PROBE_SQL returns for a server, as the arguments say."""
    found = {"in_recovery": recovery, "lsn": lsn, "paused": False, "lag_seconds": 0.0}
    return found | {"server_version": "15.20", "timeline": timeline, "sees_receiver": False} | row


def probed(endpoint: str, **row: Any) -> ServerHealth:
    """A server's health after one probe that found `probe_row(**row)`."""
    from sqlalchemy.engine import make_url

    health = ServerHealth(endpoint, make_url("postgresql+asyncpg://u@db/x"), HealthSettings())
    health.record_probe(probe_row(**row), sent_at=time.monotonic())
    return health


def test_a_write_refused_as_read_only_does_not_restart_the_primarys_lag_clock() -> None:
    from sqlalchemy.engine import make_url

    health = ServerHealth("db:5432", make_url("postgresql+asyncpg://u@db/x"), HealthSettings())
    health.record_probe(probe_row(lsn=100, timeline=1, recovery=False), sent_at=1.0)
    # What a write refused with 25006 does until the next probe (a database set read-only,
    # say): the primary is still one, and the replicas' lag is still timed by its positions.
    health.in_recovery = True
    health.record_probe(probe_row(lsn=200, timeline=1, recovery=False), sent_at=2.0)
    assert list(health.positions) == [(1.0, 100), (2.0, 200)]
    assert health.writing_since == 100


def test_in_a_split_brain_a_replica_whose_timeline_is_hidden_gets_no_read() -> None:
    new = probed("new:5432", lsn=1000, timeline=2, recovery=False)
    old = probed("old:5432", lsn=5000, timeline=1, recovery=False)  # started again as a primary
    replica = probed("replica:5432", lsn=1000, timeline=None)
    monitor = HealthMonitor(HealthSettings(), RoutingSettings(), lambda: [(new, [old, replica])])
    monitor._update_lag()
    assert not replica.fresh  # the old primary's WAL could be what moves it on
    old.eject("stopped")
    monitor._update_lag()
    assert replica.fresh  # one writer again, the one it was first seen with


def test_with_the_grant_a_replica_whose_receiver_was_never_seen_gets_no_read() -> None:
    writer = probed("primary:5432", lsn=1000, timeline=1, recovery=False)
    replica = probed("replica:5432", lsn=1000, timeline=None, sees_receiver=True)
    monitor = HealthMonitor(HealthSettings(), RoutingSettings(), lambda: [(writer, [replica])])
    monitor._update_lag()
    assert not replica.fresh  # it may follow nobody, or an old primary
    now = time.monotonic
    replica.record_probe(probe_row(lsn=1000, timeline=1, sees_receiver=True), sent_at=now())
    monitor._update_lag()
    assert replica.fresh and replica.timeline == 1
    replica.record_probe(probe_row(lsn=1000, timeline=None, sees_receiver=True), sent_at=now())
    monitor._update_lag()
    assert replica.fresh and replica.timeline == 1  # its upstream restarting: the last one seen


async def test_status_and_health_route_show_roles_lag_and_pools(router: SessionRouter) -> None:
    provider = RouterProvider(RouterSettings(http=HttpSettings(health_details_public=True)))
    provider.set(router)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(provider)), base_url="http://test"
    ) as client:
        response = await client.get("/health/db")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ok"
    assert body["monitor_running"] is True
    primary, replica = body["nodes"]["main.primary"], body["nodes"]["main.replica1"]
    assert (primary["role"], primary["state"], primary["in_recovery"]) == ("primary", "up", False)
    assert (replica["role"], replica["state"], replica["in_recovery"]) == ("replica", "up", True)
    assert isinstance(replica["lag_bytes"], int) and replica["fresh"] is True
    assert (primary["pool"]["in_use"], primary["pool"]["size"]) == (0, 5)
    assert primary["pool"]["checkouts"] >= 0 and primary["pool"]["checkout_wait_seconds"] >= 0


@pytest.mark.parametrize("policy", ["weighted", "least_in_use"])
async def test_replica_policies(migrated: DevCluster, policy: str) -> None:
    pg = migrated
    cluster = {
        "primary": pg.url(database="app", user="app"),
        "replicas": [
            {"url": pg.url(n.name, database="app", user="app"), "weight": weight}
            for n, weight in zip(pg.replicas, (3, 1), strict=True)
        ],
    }
    settings = database_settings(pg, clusters={"main": cluster}, routing={"policy": policy})
    router = SessionRouter(settings)
    ports = [n.port for n in pg.replicas]
    try:
        await router.start()
        if policy == "weighted":
            seen = []
            for _ in range(40):
                async with router.session("replica") as session:
                    seen.append(await session.scalar(WHO))
            assert (seen.count(ports[0]), seen.count(ports[1])) == (30, 10)
        else:
            async with router.session("replica") as held:  # replica1 now has one in use
                first = await held.scalar(WHO)
                for _ in range(5):
                    async with router.session("replica") as session:
                        assert await session.scalar(WHO) != first
    finally:
        await router.dispose()
