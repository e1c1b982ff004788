"""Shared fixtures: one real PostgreSQL cluster (primary + 2 streaming replicas) per test run.

The cluster is started once per session from the installed server binaries (`DevCluster`).
Tests that stop or pause nodes must leave them running and replaying when they finish. Each test
gets a fresh `SessionRouter` over the cluster, installed as the process router and disposed
afterwards, so no pool or state leaks from one test into the next.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text

from app.db.session import set_router
from app.models import Base
from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.migrate import migrate
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster

APP_ROLE = "app"
HEALTH_INTERVAL = 0.25
TENANT_DATABASES = ("acme", "umbrella")


def tenants_config(pg: DevCluster) -> dict[str, Any]:
    return {
        "acme": {"strategy": "database", "database": "acme"},
        "umbrella": {"strategy": "database", "url": pg.url(database="umbrella", user=APP_ROLE)},
        "globex": {"strategy": "schema"},
        "soylent-corp": {"strategy": "schema"},
        "initech": {"strategy": "row"},
        "hooli": {"strategy": "row"},
        "oldco": {"strategy": "row", "active": False},
    }


@contextmanager
def notes_cluster(replicas: int, *readers: str) -> Iterator[DevCluster]:
    """A cluster of its own (for faults that are a one-way trip: promotion, a failover): the
    app role owns the `app` database with a `notes (body text)` table, which `readers` (roles
    created here) may use too; every replica has the table."""
    with DevCluster(replicas=replicas) as cluster:
        cluster.create_role(APP_ROLE)
        for role in readers:
            cluster.create_role(role)
        cluster.create_database("app", owner=APP_ROLE)
        cluster.sql("primary", "CREATE TABLE notes (body text)", database="app")
        roles = ", ".join((APP_ROLE, *readers))
        cluster.sql("primary", f"GRANT ALL ON notes TO {roles}", database="app")
        cluster.wait_replayed()  # replication is asynchronous: the replicas must have the table
        yield cluster


def database_settings(
    pg: DevCluster, *, replicas: bool = True, **overrides: Any
) -> DatabaseSettings:
    config: dict[str, Any] = {
        "default_cluster": "main",
        "connect_timeout": 1.0,
        "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
        "retry": {"deadline": 2.0},
        "clusters": {
            "main": {
                "primary": pg.url(database="app", user=APP_ROLE),
                "replicas": [
                    pg.url(node.name, database="app", user=APP_ROLE) for node in pg.replicas
                ]
                if replicas
                else [],
            }
        },
        "tenants": tenants_config(pg),
    }
    config.update(overrides)
    return DatabaseSettings.model_validate(config)


def two_slot_role(pg: DevCluster, prefix: str) -> tuple[str, str]:
    """A login role (a member of the app role) that the server lets hold two connections: the
    health monitor's probe and one other. Returns (role, URL on the app database)."""
    role = f"{prefix}_{uuid.uuid4().hex[:6]}"
    pg.sql("primary", f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2 IN ROLE {APP_ROLE}")
    return role, pg.url(database="app", user=role)


def relayed_primary_settings(pg: DevCluster, port: int, **overrides: Any) -> DatabaseSettings:
    """The primary alone, reached through a loopback relay listening on `port` (fault tests)."""
    url = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{port}/app"
    return database_settings(pg, replicas=False, clusters={"main": {"primary": url}}, **overrides)


def primary_only_settings(pg: DevCluster, url: str, **overrides: Any) -> DatabaseSettings:
    """One primary at `url`, no replicas, no tenants, no catalog (so no catalog listener
    holding a connection of its own)."""
    return database_settings(
        pg,
        replicas=False,
        clusters={"main": {"primary": url}},
        tenants={},
        tenancy={"catalog": False},
        **overrides,
    )


#: An async test still running after this many seconds is stuck (the slowest take about 30 s):
#: every task's stack is printed and the test's own task is cancelled, so that a hang in a
#: test's body fails with the line it waited on instead of holding CI until its time limit.
#: (A hang in a fixture's setup is not cancelled; `faulthandler_timeout` prints its stacks.)
STUCK_AFTER = 240.0


@pytest.fixture(autouse=True)
async def _stuck_test_watchdog(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    if not inspect.iscoroutinefunction(request.function):  # sync tests never run the loop
        yield
        return
    code = request.function.__code__
    handle = asyncio.get_running_loop().call_later(
        STUCK_AFTER, _report_stuck, request.node.nodeid, code
    )
    try:
        yield
    finally:
        handle.cancel()


def _report_stuck(nodeid: str, code: Any) -> None:
    print(f"\n{nodeid} is still running after {STUCK_AFTER:g} s; its tasks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
        if getattr(task.get_coro(), "cr_code", None) is code:  # pytest-asyncio runs it as is
            task.cancel(f"stuck for {STUCK_AFTER:g} s")


@pytest.fixture(scope="session")
def pg() -> Iterator[DevCluster]:
    with DevCluster(replicas=2) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        for database in ("app", *TENANT_DATABASES):
            cluster.create_database(database, owner=APP_ROLE)
        yield cluster


@pytest.fixture(scope="session")
async def migrated(pg: DevCluster) -> DevCluster:
    router = SessionRouter(database_settings(pg))
    try:
        await migrate(router, Base.metadata)
        async with router.default_cluster.primary.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS deferred_check (x int, CONSTRAINT deferred_unique "
                    "UNIQUE (x) DEFERRABLE INITIALLY DEFERRED)"
                )
            )
    finally:
        await router.dispose()
    pg.wait_replayed()
    return pg


@pytest.fixture
async def router(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    router = SessionRouter(database_settings(migrated))
    await router.start()
    set_router(router)
    try:
        yield router
        # Every session ended is counted out of its node (drains wait on these counts).
        assert sessions_in_flight(router) == {}, sessions_in_flight(router)
    finally:
        set_router(None)
        await router.dispose()


def sessions_in_flight(router: SessionRouter) -> dict[str, int]:
    """Nodes with sessions counted in flight (none once every session has ended)."""
    nodes = {node for cluster in router.clusters.values() for node in cluster.nodes}
    return {node.name: node.in_flight for node in nodes if node.in_flight}


def one_connection_router(pg: DevCluster, **overrides: Any) -> SessionRouter:
    """A router over the primary alone with a one-connection pool: the next session surely
    gets the connection the previous one used."""
    settings = database_settings(pg, replicas=False, **overrides)
    pool = settings.clusters["main"].pool.model_copy(update={"size": 1, "max_overflow": 0})
    main = settings.clusters["main"].model_copy(update={"pool": pool})
    return SessionRouter(settings.model_copy(update={"clusters": {"main": main}}))


@pytest.fixture
async def one_connection(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    router = one_connection_router(migrated)
    try:
        yield router
    finally:
        await router.dispose()


@pytest.fixture
def restore_cluster(pg: DevCluster) -> Iterator[None]:
    """For tests that stop or pause nodes: every node running and streaming again after."""
    yield
    for node in pg.nodes.values():
        if not node.running:
            pg.start_node(node.name)
    for node in pg.replicas:
        pg.resume_replay(node.name)
    pg.wait_streaming(timeout=30)


async def scalar(router: SessionRouter, sql: str, **session_args: Any) -> Any:
    async with router.session(**session_args) as session:
        return (await session.execute(text(sql))).scalar_one()


# -- a second cluster (tests of several clusters and of tenant moves) ----------------------


@pytest.fixture(scope="session")
def second() -> Iterator[DevCluster]:
    with DevCluster(replicas=1) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        for database in ("app", "north"):
            cluster.create_database(database, owner=APP_ROLE)
        yield cluster


def two_cluster_config(main: DevCluster, second: DevCluster) -> dict[str, Any]:
    def cluster(pg: DevCluster) -> dict[str, Any]:
        return {
            "primary": pg.url(database="app", user=APP_ROLE),
            "replicas": [pg.url(node.name, database="app", user=APP_ROLE) for node in pg.replicas],
            "admin": pg.url(database="app"),  # the superuser: tenant moves need one
        }

    return {
        "default_cluster": "main",
        "connect_timeout": 1.0,
        "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
        "retry": {"deadline": 1.0},
        "clusters": {"main": cluster(main), "second": cluster(second)},
        "tenants": {
            "acme": {"strategy": "database", "database": "acme"},
            "globex": {"strategy": "schema"},
            "initech": {"strategy": "row"},
            "north-db": {"strategy": "database", "cluster": "second", "database": "north"},
            "north-schema": {"strategy": "schema", "cluster": "second"},
            "north-row": {"strategy": "row", "cluster": "second"},
        },
    }


@pytest.fixture(scope="session")
async def migrated_two(migrated: DevCluster, second: DevCluster) -> DevCluster:
    router = SessionRouter(DatabaseSettings.model_validate(two_cluster_config(migrated, second)))
    try:
        await migrate(router, Base.metadata)
    finally:
        await router.dispose()
    second.wait_replayed()
    migrated.wait_replayed()
    return second
