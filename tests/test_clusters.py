"""Two clusters, each a primary and a streaming replica: tenants of every strategy on each,
routed to their own nodes, isolated, failing over alone, with consistency tokens that speak
only for their own cluster; migrations and `check` cover both."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import two_cluster_config
from tests.support.cli import run_app, toml_of
from tests.support.faults import eventually

NORTH = {"north-db": "database", "north-schema": "schema", "north-row": "row"}
SOUTH = {"acme": "database", "globex": "schema", "initech": "row"}  # on main, from conftest


@pytest.fixture
async def two(migrated: DevCluster, migrated_two: DevCluster) -> AsyncIterator[SessionRouter]:
    config = two_cluster_config(migrated, migrated_two)
    router = SessionRouter(DatabaseSettings.model_validate(config))
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


async def write(router: SessionRouter, tenant: str, name: str) -> ConsistencyToken:
    async with router.session(tenant=tenant, consistency_token=True) as session:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
    assert session.info["node"].split(".")[0].split("@")[0] == cluster_of(tenant)
    token: ConsistencyToken = session.info["consistency_token"]
    return token


async def names(router: SessionRouter, tenant: str, **kw: Any) -> tuple[set[str], str, str]:
    async with router.session(tenant=tenant, read_only=True, **kw) as session:
        rows = await session.scalars(text("SELECT name FROM items"))
        found = set(rows)
    return found, session.info["node"], session.info["route_reason"]


def cluster_of(tenant: str) -> str:
    return "second" if tenant in NORTH else "main"


async def test_tenants_on_two_clusters_are_routed_to_their_own_nodes_and_never_cross(
    two: SessionRouter, migrated: DevCluster, migrated_two: DevCluster
) -> None:
    tag = uuid.uuid4().hex[:6]
    tenants = [*NORTH, *SOUTH]
    for round_ in range(5):  # interleaved, concurrent
        await asyncio.gather(*(write(two, t, f"{tag}-{t}-{round_}") for t in tenants))
    migrated.wait_replayed()
    migrated_two.wait_replayed()
    await two.monitor.probe_round()
    for tenant in tenants:
        found, node, _ = await names(two, tenant)
        mine = {name for name in found if name.startswith(tag)}
        assert mine == {f"{tag}-{tenant}-{r}" for r in range(5)}, tenant  # its own, all of them
        assert node.split(".")[0].split("@")[0] == cluster_of(tenant), node
        assert ".replica" in node, node  # reads on a replica of its own cluster


async def test_a_token_speaks_only_for_its_own_cluster(two: SessionRouter) -> None:
    far_ahead_on_main = ConsistencyToken("main", 2**62)  # no replica of main has replayed it
    _, node, reason = await names(two, "north-schema", after=far_ahead_on_main)
    assert node == "second.replica1" and reason == "replica"  # says nothing about second
    _, node, reason = await names(two, "globex", after=far_ahead_on_main)
    assert node == "main.primary" and reason == "consistency-token"


@pytest.mark.usefixtures("restore_cluster")
async def test_a_primary_down_on_one_cluster_never_touches_the_other(
    two: SessionRouter, migrated_two: DevCluster
) -> None:
    tag = uuid.uuid4().hex[:6]
    migrated_two.stop_node("primary")
    try:
        await eventually(
            lambda: not two.node("second.primary").health.up, within=10, what="an ejection"
        )
        for tenant in SOUTH:  # main's tenants write and read on
            await write(two, tenant, f"{tag}-{tenant}")
            await names(two, tenant)
        for tenant in NORTH:
            _, node, _ = await names(two, tenant)  # reads from second's replica
            assert node.endswith(".replica1")
            with pytest.raises(DatabaseUnavailableError) as refused:
                await write(two, tenant, f"{tag}-{tenant}")
            assert refused.value.status_code == 503
    finally:
        migrated_two.start_node("primary")
        migrated_two.wait_streaming(timeout=30)


def test_migrate_and_check_cover_every_cluster(
    migrated: DevCluster, migrated_two: DevCluster, tmp_path: Path
) -> None:
    path = tmp_path / "two.toml"
    path.write_text(toml_of({"database": two_cluster_config(migrated, migrated_two)}))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_app(path, *args)

    migrated_ = run("migrate")
    assert migrated_.returncode == 0, migrated_.stdout + migrated_.stderr
    for target in ("cluster second", "tenant north-db", "tenant north-schema", "tenant acme"):
        assert target in migrated_.stdout, target
    checked = run("check")
    assert checked.returncode == 0, checked.stderr
    for node in ("main.primary", "main.replica1", "second.primary", "second.replica1"):
        assert node in checked.stdout
    only_second = run("migrate", "current", "--cluster", "second")
    assert "tenant north-schema" in only_second.stdout and "tenant acme" not in only_second.stdout
