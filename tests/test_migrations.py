"""Alembic on every target, through `python -m app migrate` as an operator runs it.

Each test gets a database of its own on the shared cluster (its default cluster: catalog,
shared tables, schema tenants) and databases for its database tenants, described by a TOML
file the subprocesses read through `APP_CONFIG_FILE`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.migrate import app_migrations
from app.models import Base
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db import provisioning
from pg_session_router.db.catalog import catalog_metadata
from pg_session_router.db.migrate import migrate
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from pg_session_router.migrations import alembic_migrator
from tests.conftest import APP_ROLE
from tests.support.cli import run_app

ROOT = Path(__file__).resolve().parent.parent
HEAD = "0002_row_policy"

SECOND_REVISION = '''"""Adds items.note (a test revision)."""
import sqlalchemy as sa
from alembic import op

revision = "0003_note"
down_revision = "0002_row_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("note", sa.Text()))


def downgrade() -> None:
    op.drop_column("items", "note")
'''


@dataclass
class World:
    """A default database with schema tenants, plus database tenants, for one test."""

    pg: DevCluster
    config: Path
    database: str
    schemas: list[str]
    databases: list[str] = field(default_factory=list)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_app(self.config, *args)

    def sql(self, statement: str, database: str | None = None) -> str:
        return self.pg.sql("primary", statement, database=database or self.database)

    def schema_versions(self) -> dict[str, str]:
        """Each schema tenant's revision ("" without a version table)."""
        return {schema: self.version(schema=schema) for schema in self.schemas}

    def version(self, *, schema: str = "public", database: str | None = None) -> str:
        exists = self.sql(f"SELECT to_regclass('{schema}.alembic_version') IS NOT NULL", database)
        if exists != "t":
            return ""
        return self.sql(
            f"SELECT string_agg(version_num, ',') FROM {schema}.alembic_version", database
        )

    def column_exists(self, schema: str, column: str) -> bool:
        return (
            self.sql(
                "SELECT count(*) FROM information_schema.columns WHERE table_schema = "
                f"'{schema}' AND table_name = 'items' AND column_name = '{column}'"
            )
            == "1"
        )


def make_world(
    pg: DevCluster, tmp_path: Path, *, schemas: int, databases: int = 0, primary: str = ""
) -> World:
    tag = uuid.uuid4().hex[:6]
    database = f"mig_{tag}"
    pg.create_database(database, owner=APP_ROLE)
    names = [f"sch{tag}{n:02d}" for n in range(schemas)]
    tenant_databases = [f"mig_{tag}_d{n}" for n in range(databases)]
    for name in tenant_databases:
        pg.create_database(name, owner=APP_ROLE)
    url = primary or pg.url(database=database, user=APP_ROLE)
    lines = [
        "[database]",
        "connect_timeout = 1.0",
        "[database.clusters.main]",
        f'primary = "{url}"',
    ]
    for name in names:
        lines += [f"[database.tenants.{name}]", 'strategy = "schema"']
    for n, name in enumerate(tenant_databases):
        lines += [f"[database.tenants.db{tag}{n}]", 'strategy = "database"', f'database = "{name}"']
    config = tmp_path / "settings.toml"
    config.write_text("\n".join(lines) + "\n")
    return World(pg, config, database, names, tenant_databases)


def second_revision(tmp_path: Path) -> Path:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "0003_note.py").write_text(SECOND_REVISION)
    return versions


def test_every_tenant_from_empty_to_head_in_parallel_then_a_rerun_skips_them(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=50, databases=3)
    result = world.run("migrate", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert "54 targets" in result.stdout and "54 upgraded" in result.stdout
    assert set(world.schema_versions().values()) == {HEAD}
    assert world.version() == HEAD  # the default cluster's shared tables
    for database in world.databases:
        assert world.version(database=database) == HEAD
    assert world.sql("SELECT to_regclass('public.tenants') IS NOT NULL") == "t"  # the catalog

    current = world.run("migrate", "current")
    assert current.returncode == 0 and current.stdout.count("at head") == 54
    rerun = world.run("migrate")
    assert rerun.returncode == 0 and "54 unchanged" in rerun.stdout

    # A tenant added at runtime is migrated by the same code, to the same head.
    added = world.run("tenants", "add", "late-comer", "--strategy", "schema")
    assert added.returncode == 0, added.stderr
    assert world.version(schema="late_comer") == HEAD


def test_two_processes_migrating_at_once_take_turns(migrated: DevCluster, tmp_path: Path) -> None:
    world = make_world(migrated, tmp_path, schemas=5)
    env = {**os.environ, "APP_CONFIG_FILE": str(world.config)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "app", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert set(world.schema_versions().values()) == {HEAD}


def test_a_second_revision_reaches_only_the_tenant_asked_for_and_goes_back(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=3)
    assert world.run("migrate").returncode == 0
    versions = str(second_revision(tmp_path))
    first, *others = world.schemas

    upgraded = world.run("migrate", "--versions", versions, "--tenant", first)
    assert upgraded.returncode == 0, upgraded.stderr
    assert world.version(schema=first) == "0003_note" and world.column_exists(first, "note")
    for schema in others:
        assert world.version(schema=schema) == HEAD and not world.column_exists(schema, "note")
    current = world.run("migrate", "current", "--versions", versions)
    behind = current.stdout.count("not at head")
    assert behind == 3 and current.stdout.count("at head") - behind == 1

    back = world.run(
        "migrate", "downgrade", "--versions", versions, "--tenant", first, "--to", HEAD
    )
    assert back.returncode == 0, back.stderr
    assert world.version(schema=first) == HEAD and not world.column_exists(first, "note")


def test_broken_tenants_fail_alone_and_a_rerun_after_repair_completes(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=5)
    conflicting, unknown_revision, *healthy = world.schemas
    world.sql(
        f"CREATE SCHEMA {conflicting} AUTHORIZATION {APP_ROLE};"
        f"CREATE TABLE {conflicting}.items (id int, legacy text);"
        f"ALTER TABLE {conflicting}.items OWNER TO app"
    )
    world.sql(
        f"CREATE SCHEMA {unknown_revision} AUTHORIZATION {APP_ROLE};"
        f"CREATE TABLE {unknown_revision}.alembic_version (version_num varchar(32) PRIMARY KEY);"
        f"INSERT INTO {unknown_revision}.alembic_version VALUES ('does_not_exist');"
        f"ALTER TABLE {unknown_revision}.alembic_version OWNER TO app"
    )
    result = world.run("migrate", "--concurrency", "2")
    assert result.returncode == 1
    failed_line = next(line for line in result.stderr.splitlines() if line.startswith("failed:"))
    assert conflicting in failed_line and unknown_revision in failed_line
    assert "Traceback" not in result.stderr
    assert "does_not_exist" in result.stdout  # the summary says why
    assert "not stamped" in result.stdout  # an unversioned table unlike 0001's is not adopted
    for schema in healthy:
        assert world.version(schema=schema) == HEAD
    assert world.version(schema=conflicting) == ""  # left as it was

    world.sql(f"DROP TABLE {conflicting}.items; DELETE FROM {unknown_revision}.alembic_version")
    repaired = world.run("migrate")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert set(world.schema_versions().values()) == {HEAD}


async def test_a_deployment_made_by_create_all_is_stamped_then_upgraded(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=2)
    schema, unconfined = world.schemas
    settings = DatabaseSettings.model_validate(
        {
            "clusters": {"main": {"primary": migrated.url(database=world.database, user=APP_ROLE)}},
            "tenants": {name: {"strategy": "schema"} for name in world.schemas},
        }
    )
    router = SessionRouter(settings)
    try:
        await migrate(router, Base.metadata)  # the pre-Alembic way
    finally:
        await router.dispose()
    world.sql(f"INSERT INTO {schema}.items (name) VALUES ('kept')")
    # Same tables, but made by hand without row-level security: stamping must not vouch for it.
    world.sql(
        f"DROP POLICY tenant_isolation ON {unconfined}.items;"
        f"ALTER TABLE {unconfined}.items NO FORCE ROW LEVEL SECURITY"
    )

    result = world.run("migrate")
    assert result.returncode == 0, result.stderr
    assert "3 stamped" in result.stdout
    confined = world.sql(
        "SELECT relforcerowsecurity AND EXISTS (SELECT FROM pg_policies WHERE schemaname = "
        f"'{unconfined}' AND tablename = 'items') FROM pg_class "
        f"WHERE oid = '{unconfined}.items'::regclass"
    )
    assert confined == "t"
    assert world.version() == HEAD and world.version(schema=schema) == HEAD
    assert world.sql(f"SELECT name FROM {schema}.items") == "kept"

    versions = str(second_revision(tmp_path))
    upgraded = world.run("migrate", "--versions", versions)
    assert upgraded.returncode == 0 and world.version(schema=schema) == "0003_note"


async def test_the_first_revision_makes_exactly_the_models_tables(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=0)
    assert world.run("migrate").returncode == 0
    engine = create_async_engine(migrated.url(database=world.database, user=APP_ROLE))

    def differences(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
        router_owned = set(catalog_metadata.tables)  # the router's tables, not the app's

        def owned(diff: object) -> bool:
            if not isinstance(diff, tuple):
                return False
            item = diff[1]
            table = item if diff[0].endswith("_table") else getattr(item, "table", None)
            return table is not None and table.name in router_owned

        return [d for d in diffs if not owned(d)]

    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
            policies = await conn.scalar(
                text("SELECT count(*) FROM pg_policies WHERE tablename = 'items'")
            )
            assert policies == 1  # row-level security came with it
    finally:
        await engine.dispose()


def test_dry_run_prints_the_plan_and_sql_and_changes_nothing(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=2)
    result = world.run("migrate", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE items" in result.stdout
    assert f'SET LOCAL search_path TO "{world.schemas[0]}"' in result.stdout
    assert "planned" in result.stdout
    assert f'CREATE SCHEMA IF NOT EXISTS "{world.schemas[0]}"' in result.stdout
    assert world.version() == "" and set(world.schema_versions().values()) == {""}
    created = world.sql(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'sch%' OR nspname = 'tenants'"
    )
    made = world.sql("SELECT count(*) FROM pg_class WHERE relname IN ('items', 'tenants')")
    assert (created, made) == ("0", "0")  # no schema, no catalog, no table


def test_catalogued_tenants_are_migrated_by_worker_processes(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=2)
    assert world.run("migrate").returncode == 0
    tag = world.database.removeprefix("mig_")
    database = f"mig_{tag}_late"
    for args in (
        ("late-schema", "--strategy", "schema"),
        ("late-db", "--strategy", "database", "--database", database),
    ):
        added = world.run("tenants", "add", *args)
        assert added.returncode == 0, added.stderr
    down = world.run("migrate", "downgrade", "--to", "base", "--concurrency", "3")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "5 downgraded" in down.stdout
    assert world.version(schema="late_schema") == "" and world.version(database=database) == ""

    up = world.run("migrate", "--concurrency", "3", "--cluster", "main")
    assert up.returncode == 0, up.stdout + up.stderr
    assert world.version(schema="late_schema") == HEAD and world.version(database=database) == HEAD
    assert set(world.schema_versions().values()) == {HEAD}


def test_autogenerate_finds_nothing_to_change_after_the_first_revision(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=0)
    assert world.run("migrate").returncode == 0
    versions = tmp_path / "new_versions"
    versions.mkdir()
    made = world.run(
        "migrate", "revision", "-m", "nothing yet", "--autogenerate", "--versions", str(versions)
    )
    assert made.returncode == 0, made.stderr
    (script,) = versions.glob("*.py")
    upgrade = script.read_text().split("def upgrade()")[1].split("def downgrade()")[0]
    assert "pass" in upgrade and "op." not in upgrade, upgrade  # models and head agree


async def test_tenants_added_at_once_in_one_process_each_get_their_own_tables(
    migrated: DevCluster, tmp_path: Path
) -> None:
    """Alembic's `op` is process-wide: concurrent migrations in one event loop must take
    turns, or one tenant's DDL lands in another's schema."""
    world = make_world(migrated, tmp_path, schemas=0)
    assert world.run("migrate").returncode == 0
    settings = DatabaseSettings.model_validate(
        {"clusters": {"main": {"primary": migrated.url(database=world.database, user=APP_ROLE)}}}
    )
    router = SessionRouter(settings)
    names = [f"together-{n}" for n in range(4)]
    try:
        await asyncio.gather(
            *(
                provisioning.add_tenant(
                    router,
                    name,
                    TenantSettings(strategy="schema"),
                    metadata=Base.metadata,
                    migrator=alembic_migrator(app_migrations()),
                )
                for name in names
            )
        )
    finally:
        await router.dispose()
    for name in names:
        schema = name.replace("-", "_")
        assert world.version(schema=schema) == HEAD
        tables = world.sql(
            f"SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
            f"WHERE schemaname = '{schema}'"
        )
        assert tables == "alembic_version,items"


async def test_a_migration_stuck_behind_a_long_transaction_gives_up_and_resumes_later(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=2)
    assert world.run("migrate").returncode == 0
    versions = str(second_revision(tmp_path))
    busy, free = world.schemas
    engine = create_async_engine(migrated.url(database=world.database, user=APP_ROLE))
    try:
        async with engine.connect() as reader:
            # A long reading transaction: ALTER TABLE needs a lock it conflicts with.
            await reader.execute(text(f"SELECT count(*) FROM {busy}.items"))
            stuck = await asyncio.to_thread(
                world.run, "migrate", "--versions", versions, "--lock-timeout", "0.5"
            )
            await reader.rollback()
    finally:
        await engine.dispose()
    assert stuck.returncode == 1 and busy in stuck.stderr and free not in stuck.stderr
    assert "lock timeout" in stuck.stdout
    assert world.version(schema=busy) == HEAD and world.version(schema=free) == "0003_note"
    resumed = world.run("migrate", "--versions", versions)
    assert resumed.returncode == 0 and world.version(schema=busy) == "0003_note"


def test_revision_0002_replaces_the_row_policy_and_its_downgrade_brings_0001s_back(
    migrated: DevCluster, tmp_path: Path
) -> None:
    """0002 rewrites 0001's policy in the form the planner estimates (the same rows); both
    directions write out their policy, so they do the same whatever the library's is."""
    world = make_world(migrated, tmp_path, schemas=1)
    (schema,) = world.schemas
    assert world.run("migrate").returncode == 0

    def policy() -> str:
        return world.sql(
            f"SELECT qual FROM pg_policies WHERE schemaname = '{schema}' AND tablename = 'items'"
        )

    assert "IS NULL" in policy() and "DISTINCT" not in policy()
    down = world.run("migrate", "downgrade", "--tenant", schema, "--to", "0001_initial")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "DISTINCT" in policy() and world.version(schema=schema) == "0001_initial"
    assert world.run("migrate", "--tenant", schema).returncode == 0
    assert "IS NULL" in policy() and world.version(schema=schema) == HEAD
