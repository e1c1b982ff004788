"""The routing decision without a server: a target and the health last seen -> one node.

`SessionRouter.route()` does no I/O, so these tests build a router over addresses nobody
listens on and set what the health monitor would have seen.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pg_session_router.core.errors import (
    InvalidTenantError,
    NoNodeAvailableError,
    TargetError,
    TenantInactiveError,
    UnknownTenantError,
)
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target

NOWHERE = "postgresql+asyncpg://app:s3cret@10.255.255.1:{port}/app"


def offline_router(**overrides: Any) -> SessionRouter:
    config: dict[str, Any] = {
        "clusters": {
            "main": {
                "primary": NOWHERE.format(port=5432),
                "replicas": [NOWHERE.format(port=5433), NOWHERE.format(port=5434)],
            },
            "reports": {"primary": NOWHERE.format(port=6432)},
        },
        "tenants": {
            "acme": {"strategy": "database", "database": "acme"},
            "umbrella": {"strategy": "database", "url": NOWHERE.format(port=7432)},
            "globex": {"strategy": "schema"},
            "initech": {"strategy": "row"},
            "oldco": {"strategy": "row", "active": False},
        },
        "tenancy": {"catalog": False},
    }
    config.update(overrides)
    return SessionRouter(DatabaseSettings.model_validate(config))


@pytest.fixture
async def router() -> AsyncIterator[SessionRouter]:
    router = offline_router()
    try:
        yield router
    finally:
        await router.dispose()  # never connected: only closes empty pools


def probed(router: SessionRouter, node: str, *, recovery: bool, lsn: int = 100) -> None:
    health = router.node(node).health
    health.in_recovery, health.lsn = recovery, lsn


def reads(router: SessionRouter, count: int, **target: Any) -> collections.Counter[str]:
    return collections.Counter(
        router.route(Target(intent="read", **target)).node.name for _ in range(count)
    )


async def test_writes_go_to_the_primary_and_reads_spread_over_the_replicas(
    router: SessionRouter,
) -> None:
    assert router.route(Target()).node.name == "main.primary"
    assert reads(router, 10) == {"main.replica1": 5, "main.replica2": 5}


async def test_primary_reads_are_read_only_and_stay_on_the_primary(router: SessionRouter) -> None:
    route = router.route(Target.coerce("primary", read_only=True))
    assert route.node.name == "main.primary" and route.read_only


async def test_an_ejected_replica_gets_no_reads_and_none_left_means_the_primary(
    router: SessionRouter,
) -> None:
    router.node("main.replica1").health.eject("connect failed")
    assert reads(router, 4) == {"main.replica2": 4}
    router.node("main.replica2").health.eject("connect failed")
    route = router.route(Target(intent="read"))
    assert route.node.name == "main.primary" and route.read_only


async def test_a_lagging_replica_gets_no_reads(router: SessionRouter) -> None:
    router.node("main.replica2").health.fresh = False
    assert reads(router, 4) == {"main.replica1": 4}


async def test_without_fallback_no_eligible_replica_is_an_error_naming_why() -> None:
    router = offline_router(routing={"fallback_to_primary": False})
    try:
        router.node("main.replica1").health.fresh = False
        router.node("main.replica2").health.eject("probe failed")
        with pytest.raises(NoNodeAvailableError) as raised:
            router.route(Target(intent="read"))
        message = str(raised.value)
        assert "main.replica1: lagging" in message and "main.replica2: probe failed" in message
        assert "10.255.255.1" not in message and "s3cret" not in message
        assert router.route(Target()).node.name == "main.primary"  # writes unaffected
    finally:
        await router.dispose()


async def test_a_token_keeps_reads_off_replicas_that_have_not_replayed_it(
    router: SessionRouter,
) -> None:
    probed(router, "main.primary", recovery=False, lsn=500)
    probed(router, "main.replica1", recovery=True, lsn=500)
    probed(router, "main.replica2", recovery=True, lsn=400)
    assert reads(router, 4, after=ConsistencyToken("main", 450)) == {"main.replica1": 4}
    assert reads(router, 2, after=ConsistencyToken("main", 501)) == {"main.primary": 2}
    # A token of another WAL stream says nothing about these replicas.
    assert set(reads(router, 4, after=ConsistencyToken("reports", 10**9))) == {
        "main.replica1",
        "main.replica2",
    }


async def test_a_promoted_replica_takes_the_writes(router: SessionRouter) -> None:
    probed(router, "main.primary", recovery=True)
    probed(router, "main.replica1", recovery=False)
    probed(router, "main.replica2", recovery=True)
    assert router.route(Target()).node.name == "main.replica1"
    assert reads(router, 4) == {"main.primary": 2, "main.replica2": 2}


async def test_no_writable_primary_is_an_error(router: SessionRouter) -> None:
    router.node("main.primary").health.eject("connection refused")
    with pytest.raises(NoNodeAvailableError, match="no writable primary"):
        router.route(Target())


async def test_weighted_policy_splits_reads_by_weight() -> None:
    main = {
        "primary": NOWHERE.format(port=5432),
        "replicas": [
            {"url": NOWHERE.format(port=5433), "weight": 3},
            {"url": NOWHERE.format(port=5434), "weight": 1},
        ],
    }
    router = offline_router(clusters={"main": main}, routing={"policy": "weighted"})
    try:
        assert reads(router, 8) == {"main.replica1": 6, "main.replica2": 2}
    finally:
        await router.dispose()


async def test_round_robin_starts_at_a_random_replica() -> None:
    firsts = set()
    for _ in range(40):
        router = offline_router()
        firsts.add(router.route(Target(intent="read")).node.name)
        await router.dispose()
    assert firsts == {"main.replica1", "main.replica2"}


async def test_explicit_nodes_and_clusters(router: SessionRouter) -> None:
    assert router.route(Target.parse("main.replica2")).node.name == "main.replica2"
    assert router.route(Target.parse("reports:primary")).node.name == "reports.primary"
    # A cluster without replicas serves reads from its primary, read-only.
    route = router.route(Target.parse("reports:replica"))
    assert route.node.name == "reports.primary" and route.read_only


@pytest.mark.parametrize("target", ["nowhere.replica9", "bogus", "elsewhere:replica", ":primary"])
async def test_unknown_targets_are_rejected(router: SessionRouter, target: str) -> None:
    with pytest.raises(TargetError):
        router.route(Target.parse(target))


async def test_a_tenant_target_cannot_name_a_cluster(router: SessionRouter) -> None:
    with pytest.raises(TargetError):
        router.route(Target(tenant="acme", cluster="reports"))


async def test_tenants_are_placed_by_their_strategy(router: SessionRouter) -> None:
    acme = router.route(Target(tenant="acme"))
    assert acme.cluster.key == ClusterKey.tenant_database("main", "acme")
    assert acme.node.name == "main@acme.primary" and acme.placement is not None
    assert reads(router, 2, tenant="acme").keys() <= {"main@acme.replica1", "main@acme.replica2"}
    assert router.route(Target(tenant="umbrella")).node.name == "@umbrella.primary"
    globex = router.route(Target(tenant="globex"))
    assert globex.node.name == "main.primary"
    assert globex.placement is not None and globex.placement.connection_setup is not None
    assert "set_config('search_path', '\"globex\", pg_temp', false)" in (
        globex.placement.connection_setup
    )


@pytest.mark.parametrize(
    "tenant",
    [
        "",
        "ACME",
        "acme ",
        "-acme",
        "a" * 64,
        "acme;drop",
        "acme\x00",
        "\uff41\uff43\uff4d\uff45",  # full-width look-alike of "acme"
        "../acme",
        "acme.x",
    ],
)
async def test_malformed_tenant_ids_are_refused_without_echoing_them(
    router: SessionRouter, tenant: str
) -> None:
    with pytest.raises(InvalidTenantError) as raised:
        router.route(Target(tenant=tenant))
    if tenant:
        assert tenant not in str(raised.value)


async def test_unknown_and_disabled_tenants(router: SessionRouter) -> None:
    with pytest.raises(UnknownTenantError):
        router.route(Target(tenant="nobody"))
    with pytest.raises(TenantInactiveError):
        router.route(Target(tenant="oldco"))


def test_cluster_keys_round_trip() -> None:
    for key in (
        ClusterKey.configured("main"),
        ClusterKey.tenant_database("main", "acme"),
        ClusterKey.own_server("umbrella"),
    ):
        assert ClusterKey.parse(key.name) == key
    assert ClusterKey.tenant_database("main", "acme").stream == "main"
    assert ClusterKey.own_server("umbrella").stream == "@umbrella"
    with pytest.raises(TargetError):
        ClusterKey.parse("main@")


async def test_a_health_change_after_reads_were_routed_takes_effect_on_the_next_read(
    router: SessionRouter,
) -> None:
    """Clusters keep their readable replicas between reads; every change to what routing
    reads from a server's health (up, fresh, drained, its role) is seen by the next read."""
    replica1 = router.node("main.replica1").health
    changes = [
        lambda: replica1.eject("connect failed"),
        lambda: setattr(replica1, "fresh", False),
        lambda: setattr(replica1, "drained", True),
        lambda: setattr(replica1, "in_recovery", False),  # promoted: a writer now
    ]
    for change in changes:
        assert set(reads(router, 4)) == {"main.replica1", "main.replica2"}  # cached now
        change()
        assert reads(router, 4) == {"main.replica2": 4}
        replica1.admit()
        replica1.fresh, replica1.drained, replica1.in_recovery = True, False, True
