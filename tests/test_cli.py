"""The operator's command line: `check` probes, `serve` serves, errors are one line with the
right exit status, and every command's help shows an example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.cli import build_parser
from pg_session_router.devcluster import DevCluster, free_port
from tests.conftest import APP_ROLE
from tests.test_migrations import ROOT, World, make_world


@pytest.mark.usefixtures("restore_cluster")
def test_check_names_a_stopped_replica_and_a_primary_that_is_not_one(
    migrated: DevCluster, tmp_path: Path
) -> None:
    replicas = ", ".join(
        f'"{migrated.url(node.name, database="app", user=APP_ROLE)}"' for node in migrated.replicas
    )
    config = tmp_path / "nodes.toml"
    world = World(migrated, config, "app", [])
    config.write_text(
        "[database.clusters.main]\n"
        f'primary = "{migrated.url(database="app", user=APP_ROLE)}"\n'
        f"replicas = [{replicas}]\n"
    )
    healthy = world.run("check")
    assert healthy.returncode == 0, healthy.stderr
    version = migrated.sql("primary", "SHOW server_version")
    assert "3 nodes, all up" in healthy.stdout and version in healthy.stdout

    migrated.stop_node("replica2")
    stopped = world.run("check")
    assert stopped.returncode == 1
    assert "main.replica2: down" in stopped.stderr and "main.replica1" not in stopped.stderr

    config.write_text(
        "[database.clusters.main]\n"
        f'primary = "{migrated.url("replica1", database="app", user=APP_ROLE)}"\n'
    )
    standby = world.run("check")
    assert standby.returncode == 1
    assert "main.primary: configured as primary but is a standby" in standby.stderr


def test_command_line_errors_are_one_line_with_the_right_status(
    migrated: DevCluster, tmp_path: Path
) -> None:
    world = make_world(migrated, tmp_path, schemas=1)
    unknown = world.run("migrate", "--tenant", "nobody-here")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[-1] == "error: unknown tenant 'nobody-here'"
    bad_revision = world.run("migrate", "--to", "no_such_rev")
    assert bad_revision.returncode == 2 and "no_such_rev" in bad_revision.stderr
    no_target = world.run("migrate", "downgrade")
    assert no_target.returncode == 2 and "needs --to" in no_target.stderr
    with_debug = world.run("--debug", "migrate", "--tenant", "nobody-here")
    assert "Traceback" in with_debug.stderr

    world.config.write_text('[database.clusters.main]\nprimary = "not a url"\n')
    bad_config = world.run("migrate")
    assert bad_config.returncode == 2
    assert bad_config.stderr.startswith("configuration error: database.clusters.main.primary")
    assert "Traceback" not in bad_config.stderr

    (tmp_path / "down").mkdir()
    unreachable = make_world(
        migrated,
        tmp_path / "down",
        schemas=1,
        primary=f"postgresql+asyncpg://app:s3cret@127.0.0.1:{free_port()}/app",
    )
    down = unreachable.run("migrate")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "s3cret" not in down.stdout + down.stderr
    assert "cluster main" in down.stderr  # what failed is named
    no_cluster = world_ok(migrated, tmp_path / "other").run("migrate", "--cluster", "nope")
    assert no_cluster.returncode == 2 and "no cluster named 'nope'" in no_cluster.stderr


def world_ok(pg: DevCluster, path: Path) -> World:
    path.mkdir()
    return make_world(pg, path, schemas=1)


def test_every_command_helps_with_an_example() -> None:
    parser = build_parser()
    assert "example:" in parser.format_help()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"demo", "serve", "migrate", "tenants", "check", "config", "drain"}
    for name, command in commands.items():
        assert "example:" in command.format_help(), name


def test_serve_runs_the_app_in_several_workers_whose_metrics_add_up(
    migrated: DevCluster, tmp_path: Path
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[database.clusters.main]\nprimary = "{migrated.url(database="app", user=APP_ROLE)}"\n'
        '[database.tenants.globex]\nstrategy = "schema"\n'
        "[http]\nmetrics = true\nhealth_details_public = true\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--workers", "2", "--port", str(port)],
        env={**os.environ, "APP_CONFIG_FILE": str(config)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"{base}/health/db", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None, "the server exited"
                assert time.monotonic() < deadline, "the server did not answer in time"
                time.sleep(0.1)
        assert response.status_code == 200
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(30):  # new connections: spread over both workers
                client.get("/items", headers={"X-Tenant-ID": "globex", "Connection": "close"})
        scrapes = [httpx.get(f"{base}/metrics", timeout=5).text for _ in range(4)]
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert output.count("Started server process") == 2  # two workers
    for scrape in scrapes:  # whichever worker answers, it counts every worker's sessions
        reads = sum(
            sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "pgrouter_sessions_total" and sample.labels["intent"] == "read"
        )
        assert reads == 30


def test_config_masks_the_password_and_refuses_one_in_the_query(
    migrated: DevCluster, tmp_path: Path
) -> None:
    config = tmp_path / "secret.toml"
    world = World(migrated, config, "app", [])
    config.write_text(
        '[database.clusters.main]\nprimary = "postgresql://app:hunter3-secret@127.0.0.1/app"\n'
    )
    shown = world.run("config")
    assert shown.returncode == 0 and "hunter3-secret" not in shown.stdout + shown.stderr
    assert "app:***@127.0.0.1/app" in shown.stdout
    config.write_text(
        '[database.clusters.main]\nprimary = "postgresql://app@127.0.0.1/app?password=hunter3"\n'
    )
    refused = world.run("config")
    assert refused.returncode == 2 and "hunter3" not in refused.stdout + refused.stderr
    assert "password part" in refused.stderr
