"""Tenants added, disabled and removed at runtime: in code, from the command line, and seen by
other processes through the catalog."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from app.models import Base
from pg_session_router.core.errors import (
    TenantConflictError,
    TenantInactiveError,
    UnknownTenantError,
)
from pg_session_router.core.settings import TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.migrate import migrate
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.cli import run_app
from tests.support.faults import eventually

from .conftest import APP_ROLE, database_settings, scalar

WHERE = "SELECT current_database() || ':' || current_setting('search_path')"


def fresh_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def other_process(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    """A second router over the same cluster: what another app process sees."""
    router = SessionRouter(
        database_settings(migrated, tenancy={"catalog_ttl": 0.5, "catalog_min_reload": 0.2})
    )
    try:
        yield router
    finally:
        await router.dispose()


@pytest.mark.parametrize("strategy", ["schema", "row", "database"])
async def test_an_added_tenant_is_served_at_once_here_and_by_other_processes(
    router: SessionRouter, other_process: SessionRouter, strategy: str
) -> None:
    tenant = fresh_id(strategy)
    settings = {"strategy": strategy}
    if strategy == "database":
        settings["database"] = tenant.replace("-", "_")
    await provisioning.add_tenant(
        router, tenant, TenantSettings.model_validate(settings), metadata=Base.metadata
    )
    try:
        for process in (router, other_process):
            async with process.session(tenant=tenant) as session:
                await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": tenant})
                where = await session.scalar(text(WHERE))
                names = (await session.scalars(text("SELECT name FROM items"))).all()
            assert set(names) == {tenant}  # a new tenant starts empty, and sees its own row
            if strategy == "database":
                assert where.startswith(tenant.replace("-", "_") + ":")
            elif strategy == "schema":
                assert where.endswith(f'"{tenant.replace("-", "_")}", pg_temp')
            async with process.session(tenant=tenant) as session:
                await session.execute(text("DELETE FROM items"))
    finally:
        await provisioning.remove_tenant(router, tenant, drop=True, metadata=Base.metadata)


async def test_disable_and_remove_take_effect_here_at_once_and_elsewhere_within_the_ttl(
    router: SessionRouter, other_process: SessionRouter
) -> None:
    tenant = fresh_id("flaky")
    await provisioning.add_tenant(
        router, tenant, TenantSettings(strategy="row"), metadata=Base.metadata
    )
    assert await scalar(other_process, "SELECT 1", tenant=tenant) == 1

    await provisioning.set_active(router, tenant, active=False)
    with pytest.raises(TenantInactiveError):
        await scalar(router, "SELECT 1", tenant=tenant)

    async def refused_elsewhere() -> bool:
        try:
            await scalar(other_process, "SELECT 1", tenant=tenant)
        except TenantInactiveError:
            return True
        return False

    await eventually(refused_elsewhere, within=3, what="the other process to see the disable")
    await provisioning.set_active(router, tenant, active=True)
    await provisioning.remove_tenant(router, tenant)
    with pytest.raises(UnknownTenantError):
        await scalar(router, "SELECT 1", tenant=tenant)


@pytest.fixture
async def other_process_slow_to_forget(migrated: DevCluster) -> AsyncIterator[SessionRouter]:
    router = SessionRouter(database_settings(migrated, tenancy={"catalog_min_reload": 60.0}))
    try:
        yield router
    finally:
        await router.dispose()


async def test_a_burst_of_random_unknown_ids_is_batched_and_never_reads_the_catalog_whole(
    other_process_slow_to_forget: SessionRouter,
) -> None:
    """500 random ids at once (a scan, or an attacker): a few lookups by id, one at a time,
    never a read of the whole catalog; the same ids again soon cost no query at all."""
    other_process = other_process_slow_to_forget
    catalog = other_process.tenants.catalog
    assert catalog is not None

    async def probe(tenant: str) -> None:
        with pytest.raises(UnknownTenantError):
            async with other_process.session(tenant=tenant):
                pass

    ids = [f"nobody-{uuid.uuid4().hex[:8]}" for _ in range(500)]
    loads, lookups = catalog.loads, catalog.lookups
    await asyncio.gather(*(probe(tenant) for tenant in ids))
    assert catalog.loads == loads
    assert 1 <= catalog.lookups - lookups <= 3
    lookups = catalog.lookups
    await asyncio.gather(*(probe(tenant) for tenant in ids[:100]))
    assert catalog.lookups == lookups  # remembered as absent (catalog_min_reload)


async def test_management_refuses_conflicts(router: SessionRouter) -> None:
    with pytest.raises(TenantConflictError, match="configuration file"):
        await provisioning.set_active(router, "acme", active=False)
    with pytest.raises(TenantConflictError, match="already exists"):
        await provisioning.add_tenant(
            router, "globex", TenantSettings(strategy="schema"), metadata=Base.metadata
        )
    with pytest.raises(ValidationError, match="only for strategy"):
        TenantSettings.model_validate({"strategy": "row", "schema": "nope"})
    with pytest.raises(UnknownTenantError):
        await provisioning.remove_tenant(router, "never-added")


def test_command_line_adds_lists_disables_and_removes(migrated: DevCluster, tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(
        f'[database.clusters.main]\nprimary = "{migrated.url(database="app", user=APP_ROLE)}"\n'
    )
    tenant = fresh_id("cli")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_app(config, "tenants", *args)

    added = run("add", tenant, "--strategy", "schema")
    assert added.returncode == 0, added.stderr
    assert f"{tenant}\tschema\tactive\tcatalog" in run("list").stdout
    assert run("disable", tenant).returncode == 0
    assert f"{tenant}\tschema\tdisabled\tcatalog" in run("list").stdout
    duplicate = run("add", tenant, "--strategy", "schema")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    bad = run("add", "Not Valid", "--strategy", "row")
    assert bad.returncode == 2 and "malformed tenant id" in bad.stderr  # usage error
    assert run("remove", tenant, "--drop").returncode == 0
    assert tenant not in run("list").stdout
    exists = migrated.sql(
        "primary",
        f"SELECT count(*) FROM pg_namespace WHERE nspname = '{tenant.replace('-', '_')}'",
        database="app",
    )
    assert exists == "0"


async def test_a_process_that_migrated_at_startup_holds_only_what_it_uses_after(
    migrated: DevCluster, router: SessionRouter
) -> None:
    """`migrate` reads the whole catalog (it migrates every tenant); the app that ran it at
    startup then serves with the bounded cache, not with every tenant held for good."""
    added = [fresh_id("held") for _ in range(3)]
    for tenant in added:
        await provisioning.add_tenant(
            router, tenant, TenantSettings(strategy="row"), metadata=Base.metadata
        )
    app_process = SessionRouter(database_settings(migrated, tenancy={"catalog_cache_size": 1}))
    try:
        await migrate(app_process, Base.metadata)
        configured = len(app_process.settings.tenants)
        assert len(app_process.tenants) <= configured + 1
        for tenant in added:  # served all the same, one at a time
            assert (await app_process.tenants.resolve(tenant)).tenant_id == tenant
        assert len(app_process.tenants) <= configured + 1
    finally:
        await app_process.dispose()
        for tenant in added:
            await provisioning.remove_tenant(router, tenant)
