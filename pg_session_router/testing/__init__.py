"""A pytest kit for applications built on the router: real clusters, a router per test.

    # conftest.py of your app
    pytest_plugins = ["pg_session_router.testing"]

Fixtures (all backed by real PostgreSQL; nothing is mocked):

- `pg_cluster` (session): a throwaway primary + `pg_cluster_replicas` streaming replicas
  (default 2) from the installed server binaries, with an ordinary role `app` (row-level
  security applies to it) owning a database `app`. Removed at the end of the run.
- `router_settings`: `RouterSettings` for that cluster; override it to add tenants or options.
- `session_router`: a started `SessionRouter` per test, disposed afterwards, so pools never
  outlive the test's event loop (one loop per test is safe).

Helpers: `use_router(app, router)` makes an app (wired by `install_router`) use a router for a
block; `paused_replay(cluster)` holds every replica's replay (reads that must see a write then
cannot be served by a replica); `assert_routed(session, role=..., node=...)` checks where a
session went.

Test the router, do not bypass it: the usual "override get_db with a session bound to a
SAVEPOINT" never touches the router, so routing, tenancy and commits go untested. Let
requests commit for real, and clean up by tenant or by id (README, "Testing your app").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.web.installation import STATE_KEY, RouterInstallation

APP_ROLE = "app"
APP_DATABASE = "app"

__all__ = [
    "APP_DATABASE",
    "APP_ROLE",
    "assert_routed",
    "cluster_settings",
    "paused_replay",
    "use_router",
]


@pytest.fixture(scope="session")
def pg_cluster_replicas() -> int:
    """How many replicas `pg_cluster` starts; override in your conftest."""
    return 2


@pytest.fixture(scope="session")
def pg_cluster(pg_cluster_replicas: int) -> Iterator[DevCluster]:
    with DevCluster(pg_cluster_replicas) as cluster:
        cluster.create_role(APP_ROLE, createdb=True)
        cluster.create_database(APP_DATABASE, owner=APP_ROLE)
        yield cluster


def cluster_settings(cluster: DevCluster, **database: Any) -> RouterSettings:
    """Settings whose default cluster `main` is `cluster` (as role `app`, database `app`);
    `database` adds or replaces keys of the `database` section."""
    main = {
        "primary": cluster.url(database=APP_DATABASE, user=APP_ROLE),
        "replicas": [
            cluster.url(node.name, database=APP_DATABASE, user=APP_ROLE)
            for node in cluster.replicas
        ],
    }
    section: dict[str, Any] = {"clusters": {"main": main}, **database}
    return RouterSettings(database=section)


@pytest.fixture
def router_settings(pg_cluster: DevCluster) -> RouterSettings:
    return cluster_settings(pg_cluster)


@pytest.fixture
async def session_router(router_settings: RouterSettings) -> AsyncIterator[SessionRouter]:
    router = SessionRouter.from_settings(router_settings)
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


@contextmanager
def use_router(
    app: FastAPI, router: SessionRouter, *, http: HttpSettings | None = None
) -> Iterator[None]:
    """Within the block, requests to `app` (and scripts sharing its provider) use `router`,
    with the HTTP wiring of `http` (default: `HttpSettings()`, header `X-Tenant-ID`, tokens on),
    so the app's own configuration is not read."""
    installation = getattr(app.state, STATE_KEY, None)
    if not isinstance(installation, RouterInstallation):
        raise RuntimeError("use_router: call install_router(app) first")
    previous = installation.provider.current
    installation.provider.set(router)
    installation.configure(http or HttpSettings())
    try:
        yield
    finally:
        installation.provider.set(previous)


@contextmanager
def paused_replay(cluster: DevCluster) -> Iterator[None]:
    """Hold WAL replay on every replica for the block; resumed (and caught up) afterwards."""
    for node in cluster.replicas:
        cluster.pause_replay(node.name)
    try:
        yield
    finally:
        for node in cluster.replicas:
            cluster.resume_replay(node.name)
        cluster.wait_replayed()


def assert_routed(
    session: AsyncSession, *, role: str | None = None, node: str | None = None
) -> None:
    """Assert the node a routed session went to (`main.replica1`) or its kind (`replica`)."""
    where = session.info.get("node")
    if where is None:
        raise AssertionError("not a routed session (no 'node' in session.info)")
    if node is not None and where != node:
        raise AssertionError(f"session went to {where}, expected {node}")
    if role is not None and not str(where).rpartition(".")[2].startswith(role):
        raise AssertionError(f"session went to {where}, expected a {role}")
