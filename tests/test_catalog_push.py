"""Catalog changes reach every process within a second, pushed (LISTEN/NOTIFY), with the
TTL reload out of the picture; a process that missed notifications while disconnected
catches up when it reconnects."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from app.models import Base
from pg_session_router.core.errors import TenantInactiveError, UnknownTenantError
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.catalog_listener import APPLICATION_NAME
from pg_session_router.db.migrate import migrate
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import APP_ROLE, HEALTH_INTERVAL, database_settings, relayed_primary_settings
from tests.support.faults import Partition, SilentCut, eventually
from tests.support.routers import listening_router

#: Only a push can explain a change seen within this test: the TTL and miss-reloads are off.
NO_POLLING = {"catalog_ttl": 3600.0, "catalog_min_reload": 3600.0}


@pytest.fixture
async def other_process(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    async with listening_router(database_settings(migrated, tenancy=NO_POLLING)) as router:
        yield router


async def state(router: SessionRouter, tenant: str) -> str:
    """What a request for `tenant` gets from this process."""
    try:
        await router.tenants.resolve(tenant)
    except TenantInactiveError:
        return "disabled"
    except UnknownTenantError:
        return "unknown"
    return "active"


async def in_state(router: SessionRouter, tenant: str, expected: str) -> bool:
    return await state(router, tenant) == expected


async def test_add_disable_remove_reach_another_process_within_a_second(
    router: SessionRouter, other_process: SessionRouter
) -> None:
    tenant = f"pushed-{uuid.uuid4().hex[:6]}"
    assert other_process.status()["tenancy"]["catalog_push"] is True
    # Asked for before it exists: remembered as absent (for an hour, NO_POLLING), so only
    # the push can make it known.
    assert await state(other_process, tenant) == "unknown"
    await provisioning.add_tenant(
        router, tenant, TenantSettings(strategy="schema"), metadata=Base.metadata
    )
    await eventually(lambda: in_state(other_process, tenant, "active"), within=1.0, what="add")
    await provisioning.set_active(router, tenant, active=False)
    await eventually(lambda: in_state(other_process, tenant, "disabled"), within=1.0, what="off")
    await provisioning.remove_tenant(router, tenant, drop=True, metadata=Base.metadata)
    await eventually(lambda: in_state(other_process, tenant, "unknown"), within=1.0, what="rm")


async def test_a_change_made_while_disconnected_is_seen_after_the_reconnect(
    router: SessionRouter, other_process: SessionRouter, migrated: DevCluster
) -> None:
    tenant = f"missed-{uuid.uuid4().hex[:6]}"
    listener = other_process.catalog_listener
    assert listener is not None
    assert await state(other_process, tenant) == "unknown"  # remembered as absent
    terminated = migrated.sql(
        "primary",
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = '{APPLICATION_NAME}'",
    )
    assert int(terminated) >= 1
    await eventually(lambda: not listener.listening.is_set(), within=2.0, what="the drop")
    # Nobody of that process listens now: this notification reaches no one there.
    await provisioning.add_tenant(
        router, tenant, TenantSettings(strategy="schema"), metadata=Base.metadata
    )
    try:
        await eventually(
            lambda: in_state(other_process, tenant, "active"), within=5.0, what="the catch-up"
        )
    finally:
        await provisioning.remove_tenant(router, tenant, drop=True, metadata=Base.metadata)


async def test_a_listener_cut_off_without_a_fin_notices_and_subscribes_again(
    migrated: DevCluster,
) -> None:
    """The listener's connection sits idle waiting for notifications; cut off silently (no FIN,
    nothing acknowledged), it would stay "subscribed" to nothing for ever. The kernel drops it
    after `dead_connection_timeout`, and the listener subscribes again once the network is back."""
    async with SilentCut(migrated.primary.port) as relay:  # a plain relay: never cut()
        settings = relayed_primary_settings(
            migrated, relay.port, tenancy=NO_POLLING, dead_connection_timeout=2.0
        )
        with Partition(relay.port) as partition:
            async with listening_router(settings) as router:
                listener = router.catalog_listener
                assert listener is not None
                partition.cut()
                await eventually(
                    lambda: not listener.listening.is_set(), within=2.0 + 2.0, what="the drop"
                )
                partition.heal()
                await eventually(listener.listening.is_set, within=10, what="re-subscribed")


@pytest.fixture(scope="module")
def failover_cluster() -> Iterator[DevCluster]:
    with DevCluster(replicas=1) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        cluster.create_database("app", owner=APP_ROLE)
        yield cluster


def discovering(pg: DevCluster) -> DatabaseSettings:
    nodes = [pg.url(name, database="app", user=APP_ROLE) for name in pg.nodes]
    return DatabaseSettings.model_validate(
        {
            "connect_timeout": 1.0,
            "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
            "retry": {"deadline": 10.0},
            "clusters": {"main": {"nodes": nodes}},  # roles discovered by the monitor
            "tenancy": NO_POLLING,
        }
    )


async def test_the_listener_follows_a_promotion_and_hears_changes_made_on_the_new_primary(
    failover_cluster: DevCluster,
) -> None:
    operator = SessionRouter(discovering(failover_cluster))
    await migrate(operator, Base.metadata)  # the catalog
    failover_cluster.wait_replayed()
    other = SessionRouter(discovering(failover_cluster))
    await other.start()
    await operator.start()
    try:
        listener = other.catalog_listener
        assert listener is not None
        await asyncio.wait_for(listener.listening.wait(), timeout=5)
        tenant = f"after-failover-{uuid.uuid4().hex[:6]}"
        assert await state(other, tenant) == "unknown"  # remembered as absent for an hour
        failover_cluster.stop_node("primary", mode="fast")
        failover_cluster.promote("replica1")
        await eventually(
            lambda: (
                other.default_cluster.writer() is not None
                and other.default_cluster.writer().name == "main.node2"
            ),  # type: ignore[union-attr]
            within=10,
            what="the new primary found",
        )
        await eventually(listener.listening.is_set, within=10, what="re-subscribed")
        await eventually(
            lambda: operator.default_cluster.writer() is not None, within=10, what="operator"
        )
        await provisioning.add_tenant(
            operator, tenant, TenantSettings(strategy="schema"), metadata=Base.metadata
        )
        await eventually(lambda: in_state(other, tenant, "active"), within=1.0, what="pushed")
    finally:
        await other.dispose()
        await operator.dispose()
