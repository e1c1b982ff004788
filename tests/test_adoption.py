"""Adoption by another team: a host project whose own package is `app` installs the library
into a fresh virtualenv and runs the README's "Use it in your app" and "Testing your app" code,
as written there, against real clusters. No rename, no copy of our code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.servers import uvicorn_server

from .conftest import APP_ROLE

ROOT = Path(__file__).resolve().parent.parent
_NOT_SHIPPED = (".venv", ".git", "*cache*", "*.egg-info", "build", "tests", "bench", "app")
_FILE_BLOCK = re.compile(r"```(?:python|toml)\n# file: (?P<path>\S+)\n(?P<body>.*?)```", re.S)


def readme_files() -> dict[str, str]:
    """The host project's files, exactly as the README shows them."""
    readme = (ROOT / "README.md").read_text()
    return {m["path"]: m["body"] for m in _FILE_BLOCK.finditer(readme)}


@pytest.fixture(scope="module")
def host_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("host-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # A copy, as a published sdist would be: pip's build leaves nothing in the checkout.
    source = tmp_path_factory.mktemp("source") / "pg-session-router"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SHIPPED))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{source}[testing]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def host_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("host-project")
    files = readme_files()
    assert {"app/main.py", "app/db.py", "tests/conftest.py", "tests/test_notes.py"} <= set(files)
    for relative, body in files.items():
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    (project / "app" / "__init__.py").write_text("")
    return project


def host_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "ROUTER_"))}
    env.pop("PYTHONPATH", None)
    # The host's own use of these names must not reach the library.
    return {**env, "APP_CONFIG_FILE": "test", "APP_DATABASE__URL": "sqlite://", **extra}


def test_the_installed_library_is_typed_and_ships_no_app_package(host_python: Path) -> None:
    site = subprocess.run(
        [str(host_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    assert (Path(site) / "pg_session_router" / "py.typed").is_file()
    assert not (Path(site) / "app").exists()


@pytest.fixture
def host_server(
    host_python: Path, host_project: Path, migrated: DevCluster, tmp_path: Path
) -> Iterator[str]:
    config = tmp_path / "router.toml"
    replicas = ", ".join(
        f'"{migrated.url(node.name, database="app", user=APP_ROLE)}"' for node in migrated.replicas
    )
    config.write_text(
        "[database.clusters.main]\n"
        f'primary = "{migrated.url(database="app", user=APP_ROLE)}"\n'
        f"replicas = [{replicas}]\n"
        "[database.health]\ninterval = 0.25\n"
    )
    with uvicorn_server(
        host_python,
        "app.main:app",
        cwd=host_project,
        env=host_env(ROUTER_CONFIG_FILE=str(config)),
        log=tmp_path / "server.log",
    ) as url:
        yield url


async def test_a_host_app_named_app_serves_through_the_router(
    host_server: str, router: SessionRouter, pg: DevCluster
) -> None:
    async with router.session() as session:
        await session.execute(text("CREATE TABLE IF NOT EXISTS notes (id serial, body text)"))
    pg.wait_replayed()
    async with httpx.AsyncClient(base_url=host_server, timeout=30) as client:
        for node in pg.replicas:
            pg.pause_replay(node.name)
        try:
            created = await client.post("/notes", json={"body": "from the host"})
            assert created.status_code == 201, created.text
            token = created.headers["X-Consistency-Token"]
            read = await client.get(
                f"/notes/{created.json()['id']}", headers={"X-Consistency-Token": token}
            )
            assert read.json() == {"body": "from the host", "node": "main.primary"}
        finally:
            for node in pg.replicas:
                pg.resume_replay(node.name)
        pg.wait_replayed()
        batch = await client.post("/notes/batch", json=[{"body": "b1"}, {"body": "b2"}])
        assert batch.status_code == 201 and "X-Consistency-Token" in batch.headers
        edited = await client.put(f"/notes/{created.json()['id']}", json={"body": "edited"})
        assert edited.status_code == 200, edited.text
        pg.wait_replayed()
        plain = await client.get(f"/notes/{created.json()['id']}")
        assert plain.json()["body"] == "edited"
        assert plain.json()["node"].startswith("main.replica")
        # install_router alone gives the host app its health route, details for operators only.
        health = await client.get("/health/db")
        assert health.status_code == 200 and set(health.json()) == {"status"}
    async with router.session() as session:
        bodies = set((await session.scalars(text("SELECT body FROM notes"))).all())
        await session.execute(text("DROP TABLE notes"))
    assert {"edited", "b1", "b2"} <= bodies


def test_the_host_script_uses_the_same_router(
    host_python: Path, host_project: Path, migrated: DevCluster, tmp_path: Path
) -> None:
    config = tmp_path / "router.toml"
    config.write_text(
        f'[database.clusters.main]\nprimary = "{migrated.url(database="app", user=APP_ROLE)}"\n'
    )
    create = "CREATE TABLE IF NOT EXISTS notes (id serial, body text)"
    migrated.sql("primary", f"SET ROLE {APP_ROLE}; {create}", database="app")
    result = subprocess.run(
        [str(host_python), "-m", "app.report"],
        cwd=host_project,
        env=host_env(ROUTER_CONFIG_FILE=str(config)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("notes: ")


def test_the_host_test_suite_runs_on_the_testing_kit(host_python: Path, host_project: Path) -> None:
    result = subprocess.run(
        [str(host_python), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=host_project,
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
