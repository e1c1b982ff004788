"""The targeted scripts (`python -m app.scripts.report`, `python -m app.scripts.backfill`) run
as an operator runs them: subprocesses over a configuration file, on the real cluster.

Rows are written and checked with psql as the superuser, each test's under a name prefix of its
own, so rows other tests leave in the same tenants change nothing here.
"""

from __future__ import annotations

import math
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pg_session_router.devcluster import DevCluster

from .conftest import APP_ROLE, HEALTH_INTERVAL, tenants_config
from .support.cli import run_app, toml_of

NORMALISED = r"btrim(regexp_replace(name, '\s+', ' ', 'g'))"

#: Where each tenant used here keeps its items: (database, table, row tenant id or None).
STORAGE = {
    "acme": ("acme", "public.items", None),  # strategy database
    "globex": ("app", "globex.items", None),  # strategy schema
    "initech": ("app", "public.items", "initech"),  # strategy row
    "hooli": ("app", "public.items", "hooli"),  # strategy row
}

Run = Callable[..., subprocess.CompletedProcess[str]]


def fresh_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_config(pg: DevCluster, path: Path, extra_tenants: dict[str, Any] | None = None) -> Path:
    """The app's settings file: the cluster with its replicas, and conftest's tenants."""
    database = {
        "default_cluster": "main",
        "connect_timeout": 1.0,
        "health": {"interval": HEALTH_INTERVAL, "probe_timeout": 0.5},
        "retry": {"deadline": 2.0},
        "clusters": {
            "main": {
                "primary": pg.url(database="app", user=APP_ROLE),
                "replicas": [
                    pg.url(node.name, database="app", user=APP_ROLE) for node in pg.replicas
                ],
            }
        },
        "tenants": {**tenants_config(pg), **(extra_tenants or {})},
    }
    path.write_text(toml_of({"database": database}))
    return path


def script_runner(config: Path) -> Run:
    def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_app(config, *args, module=f"app.scripts.{script}", timeout=120)

    return run


@pytest.fixture
def run(migrated: DevCluster, tmp_path: Path) -> Run:
    return script_runner(write_config(migrated, tmp_path / "settings.toml"))


# -- the tenants' rows, through psql as the superuser ----------------------------------------


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def insert(pg: DevCluster, tenant: str, *names: str) -> None:
    database, table, row_tenant = STORAGE[tenant]
    columns = "name" if row_tenant is None else "name, tenant_id"
    for name in names:
        values = literal(name) if row_tenant is None else f"{literal(name)}, {literal(row_tenant)}"
        pg.sql("primary", f"INSERT INTO {table} ({columns}) VALUES ({values})", database=database)


def count(pg: DevCluster, tenant: str, condition: str) -> int:
    database, table, row_tenant = STORAGE[tenant]
    if row_tenant is not None:
        condition += f" AND tenant_id = {literal(row_tenant)}"
    return int(
        pg.sql("primary", f"SELECT count(*) FROM {table} WHERE {condition}", database=database)
    )


def pending(pg: DevCluster, tenant: str, prefix: str = "") -> int:
    """Rows of the tenant (with `prefix` in their name) not normalised yet."""
    return count(pg, tenant, f"name <> {NORMALISED} AND strpos(name, {literal(prefix)}) > 0")


def names(pg: DevCluster, tenant: str, prefix: str) -> list[str]:
    """The names containing `prefix`, oldest first (only for names without newlines)."""
    database, table, _ = STORAGE[tenant]
    sql = f"SELECT name FROM {table} WHERE strpos(name, {literal(prefix)}) > 0 ORDER BY id"
    output = pg.sql("primary", sql, database=database)
    return output.splitlines() if output else []


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The cells of each row of a rich table, by the first cell (wrapped lines left out)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


# -- report ----------------------------------------------------------------------------------


def test_report_prints_a_tenants_items_read_from_a_replica_and_no_other_tenants(
    migrated: DevCluster, run: Run
) -> None:
    mark = fresh_id("report")
    insert(migrated, "acme", f"{mark} acme older", f"{mark} acme newer")
    insert(migrated, "globex", f"{mark} globex")
    insert(migrated, "initech", f"{mark} initech older", f"{mark} initech newer")
    insert(migrated, "hooli", f"{mark} hooli")
    migrated.wait_replayed()

    acme = run("report", "--tenant", "acme")
    assert acme.returncode == 0, acme.stderr
    assert f"{mark} acme older" in acme.stdout and f"{mark} acme newer" in acme.stdout
    assert f"{mark} globex" not in acme.stdout
    total = count(migrated, "acme", "true")
    assert f"tenant acme: {total} items" in acme.stdout
    assert "read from main@acme.replica" in acme.stdout, acme.stdout  # a replica served it

    initech = run("report", "--tenant", "initech", "--limit", "1")
    assert initech.returncode == 0, initech.stderr
    assert f"{mark} initech newer" in initech.stdout  # the newest only
    assert f"{mark} initech older" not in initech.stdout
    assert f"{mark} hooli" not in initech.stdout  # row-level security: another row tenant
    assert "read from main.replica" in initech.stdout, initech.stdout


@pytest.mark.parametrize("script", ["report", "backfill"])
def test_an_unknown_tenant_is_one_line_on_stderr_and_exit_2(run: Run, script: str) -> None:
    tenant = fresh_id("nosuch")
    result = run(script, "--tenant", tenant)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert tenant in result.stderr and "unknown tenant" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_are_a_usage_error(run: Run) -> None:
    result = run("backfill", "--batch-size", "0")
    assert result.returncode == 2 and "must be at least 1" in result.stderr


# -- backfill --------------------------------------------------------------------------------

MESSY = ("  {p} a   b  ", "{p}\tc\n\n d", " {p}  e", "{p} clean")
CLEAN = ["{p} a b", "{p} c d", "{p} e", "{p} clean"]
TENANTS = ("acme", "globex", "initech")  # one of each strategy


def test_backfill_dry_run_then_batches_then_nothing_left(migrated: DevCluster, run: Run) -> None:
    prefix = fresh_id("backfill")
    for tenant in TENANTS:
        insert(migrated, tenant, *(name.format(p=prefix) for name in MESSY))
        assert pending(migrated, tenant, prefix) == 3
    migrated.wait_replayed()
    # Whatever else these tenants hold that needs it is counted and changed too.
    before = {tenant: pending(migrated, tenant) for tenant in TENANTS}

    dry = run("backfill", "--dry-run")  # every tenant, on the replicas
    assert dry.returncode == 0, dry.stdout + dry.stderr
    rows = summary_rows(dry.stdout)
    for tenant in TENANTS:
        assert rows[tenant][2] == str(before[tenant]), dry.stdout  # "would change"
        assert pending(migrated, tenant, prefix) == 3  # nothing changed
    assert rows["oldco"][-1] == "skipped: disabled", dry.stdout
    assert "would change (dry run: nothing changed)" in dry.stdout

    chosen = [arg for tenant in TENANTS for arg in ("--tenant", tenant)]
    done = run("backfill", *chosen, "--batch-size", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    for tenant in TENANTS:
        changed, batches, result = rows[tenant][2], rows[tenant][3], rows[tenant][-1]
        assert changed == str(before[tenant]), done.stdout
        assert batches == str(math.ceil(before[tenant] / 2)) and result == "done", done.stdout
        assert names(migrated, tenant, prefix) == [name.format(p=prefix) for name in CLEAN]
        assert pending(migrated, tenant) == 0
    assert "oldco" not in rows  # only the tenants asked for

    again = run("backfill", *chosen, "--batch-size", "2")  # resumable: nothing left to do
    assert again.returncode == 0, again.stdout + again.stderr
    rows = summary_rows(again.stdout)
    assert all(rows[tenant][2:4] == ["0", "0"] for tenant in TENANTS), again.stdout
    assert all(rows[tenant][-1] == "nothing to do" for tenant in TENANTS), again.stdout


def test_backfill_goes_on_past_a_failing_tenant_and_names_it(
    migrated: DevCluster, tmp_path: Path
) -> None:
    lost = fresh_id("lost")  # a schema tenant whose schema was never created
    config = write_config(migrated, tmp_path / "settings.toml", {lost: {"strategy": "schema"}})
    run = script_runner(config)
    prefix = fresh_id("survivor")
    insert(migrated, "globex", *(name.format(p=prefix) for name in MESSY))

    result = run("backfill", "--tenant", lost, "--tenant", "globex")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"failed: {lost}" in result.stderr
    assert "globex" not in result.stderr and "Traceback" not in result.stderr
    rows = summary_rows(result.stdout)
    assert rows[lost][-1].startswith("FAILED"), result.stdout
    assert rows["globex"][-1] == "done", result.stdout
    assert names(migrated, "globex", prefix) == [name.format(p=prefix) for name in CLEAN]
