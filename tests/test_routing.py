"""Which node a target reaches: primary for writes, replicas for reads, READ ONLY fallback."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from pg_session_router.core.errors import ReadOnlySessionError
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster

from .conftest import database_settings, scalar

WHERE = "SELECT pg_is_in_recovery()::text || ':' || inet_server_port()"


async def test_default_and_primary_targets_reach_the_primary(
    router: SessionRouter, pg: DevCluster
) -> None:
    expected = f"false:{pg.primary.port}"
    assert await scalar(router, WHERE) == expected
    assert await scalar(router, WHERE, target="primary") == expected


async def test_replica_target_reaches_a_replica(router: SessionRouter, pg: DevCluster) -> None:
    recovery, port = (await scalar(router, WHERE, target="replica")).split(":")
    assert recovery == "true"
    assert int(port) in {node.port for node in pg.replicas}


async def test_reads_spread_over_both_replicas(router: SessionRouter, pg: DevCluster) -> None:
    ports = [int((await scalar(router, WHERE, target="replica")).split(":")[1]) for _ in range(10)]
    assert set(ports) == {node.port for node in pg.replicas}
    assert ports.count(pg.replicas[0].port) == 5  # round-robin: an even split


async def test_read_only_flag_on_default_target_reads_from_a_replica(
    router: SessionRouter,
) -> None:
    assert (await scalar(router, WHERE, read_only=True)).startswith("true:")


async def test_primary_with_read_only_stays_on_the_primary_in_a_read_only_transaction(
    router: SessionRouter, pg: DevCluster
) -> None:
    async with router.session("primary", read_only=True) as session:
        assert (await session.execute(text(WHERE))).scalar_one() == f"false:{pg.primary.port}"
        assert (await session.execute(text("SHOW transaction_read_only"))).scalar_one() == "on"


async def test_without_replicas_reads_go_to_the_primary_read_only(migrated: DevCluster) -> None:
    router = SessionRouter(database_settings(migrated, replicas=False))
    try:
        async with router.session("replica") as session:
            where = (await session.execute(text(WHERE))).scalar_one()
            assert where == f"false:{migrated.primary.port}"
            assert (await session.execute(text("SHOW transaction_read_only"))).scalar_one() == "on"
        # The read-only flag is per transaction: the pooled connection is a writer again.
        async with router.session() as session:
            assert (await session.execute(text("SHOW transaction_read_only"))).scalar_one() == "off"
    finally:
        await router.dispose()


async def test_write_through_a_read_session_is_a_clear_error(router: SessionRouter) -> None:
    for target in ("replica", "primary"):
        with pytest.raises(ReadOnlySessionError, match="read-only session"):
            async with router.session(target, read_only=True) as session:
                await session.execute(text("INSERT INTO items (name) VALUES ('nope')"))


async def test_node_names_and_cluster_prefixes_address_nodes(
    router: SessionRouter, pg: DevCluster
) -> None:
    assert (
        await scalar(router, WHERE, target="main.replica2") == f"true:{pg.nodes['replica2'].port}"
    )
    assert await scalar(router, WHERE, target="main.primary") == f"false:{pg.primary.port}"
    assert (await scalar(router, WHERE, target="main:replica")).startswith("true:")
    assert await scalar(router, WHERE, target=Target(cluster="main")) == f"false:{pg.primary.port}"


async def test_a_write_on_the_primary_becomes_visible_on_every_replica(
    router: SessionRouter, pg: DevCluster
) -> None:
    async with router.session() as session:
        item_id = (
            await session.execute(
                text("INSERT INTO items (name) VALUES ('replicated') RETURNING id")
            )
        ).scalar_one()
    pg.wait_replayed()
    for node in pg.replicas:
        name = await scalar(
            router, f"SELECT name FROM items WHERE id = {item_id}", target=f"main.{node.name}"
        )
        assert name == "replicated"


async def test_each_node_has_its_own_pool(router: SessionRouter) -> None:
    engines = {id(node.engine) for cluster in router.clusters.values() for node in cluster.nodes}
    pools = {id(node.engine.pool) for cluster in router.clusters.values() for node in cluster.nodes}
    assert len(engines) == len(pools) == 3


async def test_orm_changes_in_a_read_session_are_refused_not_dropped(
    router: SessionRouter,
) -> None:
    from app.models import Item

    for target in ("replica", "primary"):
        with pytest.raises(ReadOnlySessionError, match="unsaved changes"):
            async with router.session(target, read_only=True) as session:
                session.add(Item(name="would-be-lost"))
