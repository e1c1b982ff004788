"""Passwords from providers: a secret rotated in PostgreSQL and in its file while clients run
costs no request; providers name their source, never the secret; one source of passwords."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from pg_session_router.core.errors import CredentialsError
from pg_session_router.core.settings import CredentialsSettings, DatabaseSettings
from pg_session_router.db.credentials import EnvPassword, FilePassword, FunctionPassword
from pg_session_router.db.driver_errors import CREDENTIALS_SQLSTATES, sqlstate
from pg_session_router.db.events import RouterObserver
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import APP_ROLE, database_settings
from tests.support.faults import eventually

ROLE = "rotating"
FIRST, SECOND = "first-secret-Zq1", "second-secret-Xw2"


@pytest.fixture
def rotating_role(migrated: DevCluster) -> Iterator[str]:
    """A role that must give a password (scram), a member of the app's role."""
    hba = migrated.nodes["primary"].data_dir / "pg_hba.conf"
    original = hba.read_text()
    migrated.sql("primary", f"DROP ROLE IF EXISTS {ROLE}")
    migrated.sql("primary", f"CREATE ROLE {ROLE} LOGIN PASSWORD '{FIRST}' IN ROLE {APP_ROLE}")
    hba.write_text(f"host all {ROLE} 127.0.0.1/32 scram-sha-256\n" + original)
    migrated.sql("primary", "SELECT pg_reload_conf()")
    try:
        yield ROLE
    finally:
        hba.write_text(original)
        migrated.sql("primary", "SELECT pg_reload_conf()")
        migrated.sql(
            "primary",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{ROLE}'",
        )
        migrated.sql("primary", f"DROP ROLE IF EXISTS {ROLE}")


def settings_with(pg: DevCluster, credentials: dict[str, Any], **pool: Any) -> DatabaseSettings:
    config = database_settings(pg, replicas=False).model_dump()
    main = config["clusters"]["main"]
    main["primary"] = pg.url(database="app", user=ROLE)
    main["credentials"] = credentials
    main["pool"] = {**main["pool"], **pool}
    config["tenants"] = {"globex": {"strategy": "schema"}}
    return DatabaseSettings.model_validate(config)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "pg-password"
    path.write_text(FIRST + "\n")
    return path


def rotate(path: Path, secret: str) -> None:
    """What a secrets manager does to a mounted secret: a new file moved into place."""
    fresh = path.with_suffix(".new")
    fresh.write_text(secret + "\n")
    fresh.replace(path)


class AuthRetries(RouterObserver):
    def __init__(self) -> None:
        self.count = 0

    def retried(self, kind: str, error: BaseException) -> None:
        if sqlstate(error) in CREDENTIALS_SQLSTATES:
            self.count += 1


async def test_a_password_rotated_in_postgres_and_in_its_file_costs_no_request(
    migrated: DevCluster, rotating_role: str, secret_file: Path
) -> None:
    # Connections recycled every second: new ones keep being made throughout.
    router = SessionRouter(settings_with(migrated, {"file": str(secret_file)}, recycle=1))
    refused = AuthRetries()
    router.events.subscribe(refused)
    await router.start()
    errors: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def client(me: int) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with router.session(tenant="globex") as session:
                    await session.execute(
                        text("INSERT INTO items (name) VALUES (:n)"), {"n": f"rot-{me}"}
                    )
                async with router.session(tenant="globex", read_only=True) as session:
                    await session.scalar(text("SELECT count(*) FROM items"))
                done += 1
            except Exception as exc:
                errors.append(repr(exc))
            await asyncio.sleep(0.005)

    async def reader() -> None:
        # Reads alone: a read checks its connection out at its first statement, where a
        # refused password must be replayed like any refused connection.
        while not stop.is_set():
            try:
                async with router.session(tenant="globex", read_only=True) as session:
                    await session.scalar(text("SELECT 1"))
            except Exception as exc:
                errors.append(repr(exc))
            await asyncio.sleep(0.005)

    clients = [
        *(asyncio.create_task(client(me)) for me in range(4)),
        *(asyncio.create_task(reader()) for _ in range(2)),
    ]
    try:
        await eventually(lambda: done > 20, within=10, what="traffic with the first secret")
        # The rotation, as an operator or a secrets manager does it: the server first, the
        # mounted file a moment later (new connections in between are refused and retried).
        rotated_at = migrated.sql("primary", "SELECT now()")
        migrated.sql("primary", f"ALTER ROLE {ROLE} PASSWORD '{SECOND}'")
        # Held open until a new connection has actually been refused (and is being retried).
        await eventually(lambda: refused.count > 0, within=10, what="a refused connection")
        rotate(secret_file, SECOND)

        def new_connections_since_rotation() -> bool:
            count = migrated.sql(
                "primary",
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE usename = '{ROLE}' AND backend_start > '{rotated_at}'",
            )
            return int(count) >= 2

        await eventually(new_connections_since_rotation, within=10, what="reconnections")
        before = done
        await eventually(lambda: done > before + 20, within=10, what="traffic after rotation")
    finally:
        stop.set()
        await asyncio.gather(*clients)
        await router.dispose()
    assert errors == []


async def test_providers_name_their_source_never_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PG_ROUTER_TEST_SECRET", FIRST)
    env = EnvPassword("PG_ROUTER_TEST_SECRET")
    assert await env() == FIRST and FIRST not in repr(env)
    path = tmp_path / "secret"
    path.write_text(FIRST)
    from_file = FilePassword(path)
    assert await from_file() == FIRST and FIRST not in repr(from_file)
    path.write_text(SECOND)
    assert await from_file() == SECOND  # re-read when it changes
    path.write_text("")  # rewritten in place: for a moment, empty
    assert await from_file() == SECOND  # the last password it held
    path.unlink()
    with pytest.raises(CredentialsError) as missing:
        await FilePassword(path)()  # never held one: says which file, nothing more
    assert str(path) in str(missing.value)
    path.write_bytes(b"\xff\xfe" + SECOND.encode())
    with pytest.raises(CredentialsError, match="not UTF-8") as garbled:
        await FilePassword(path)()
    assert SECOND not in str(garbled.value)
    with pytest.raises(CredentialsError, match="PG_ROUTER_UNSET"):
        await EnvPassword("PG_ROUTER_UNSET")()


calls = 0


async def short_lived_token() -> tuple[str, float]:
    global calls
    calls += 1
    return f"token-{uuid.uuid4().hex}", 900.0


async def failing_token() -> str:
    raise RuntimeError(f"cloud says no: {FIRST}")


async def test_a_function_is_called_once_per_lifetime_and_fails_saying_nothing_secret() -> None:
    token = FunctionPassword(f"{__name__}:short_lived_token")
    before = calls
    first = await asyncio.gather(*(token() for _ in range(10)))
    assert len(set(first)) == 1 and calls == before + 1  # shared, cached until near expiry
    failing = FunctionPassword(f"{__name__}:failing_token")
    with pytest.raises(CredentialsError) as failed:
        await failing()
    assert FIRST not in str(failed.value) and "RuntimeError" in str(failed.value)


def test_one_source_of_passwords_per_cluster(migrated: DevCluster) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        CredentialsSettings.model_validate({"env": "A", "file": "/run/secret"})
    config = database_settings(migrated).model_dump()
    config["clusters"]["main"]["primary"] = migrated.url(database="app", user=ROLE).replace(
        f"{ROLE}@", f"{ROLE}:inline@"
    )
    config["clusters"]["main"]["credentials"] = {"env": "PGPASSWORD_MAIN"}
    with pytest.raises(ValidationError, match="one source"):
        DatabaseSettings.model_validate(config)
