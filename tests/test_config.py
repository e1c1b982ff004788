"""Settings: sources and their order, errors that name the key, and no leaked passwords."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.config import load_settings
from pg_session_router.core.errors import ConfigError
from pg_session_router.db.router import SessionRouter

SECRET = "s3cret-Pa55"
GOOD = f"""
[database]
default_cluster = "main"
[database.clusters.main]
primary = "postgresql+asyncpg://app:{SECRET}@127.0.0.1:5432/app"
replicas = ["postgresql://app:{SECRET}@127.0.0.1:5433/app"]
[database.clusters.main.pool]
size = 3
[database.tenants.acme]
strategy = "database"
url = "postgresql+asyncpg://app:{SECRET}@127.0.0.1:5432/acme"
[database.tenants.globex]
strategy = "schema"
schema = "globex"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("APP_CONFIG_FILE", str(path))
    monkeypatch.chdir(tmp_path)  # no stray .env from the checkout
    for name in list(__import__("os").environ):
        if name.startswith("APP_DATABASE"):
            monkeypatch.delenv(name)
    return path


def test_toml_file_is_read(config_file: Path) -> None:
    database = load_settings().database
    main = database.clusters["main"]
    assert main.primary.port == 5432 and main.primary.database == "app"
    assert (
        main.replicas[0].url.drivername == "postgresql+asyncpg"
    )  # plain postgresql:// is accepted
    assert main.pool.size == 3 and main.pool.max_overflow == 5  # unset keys keep defaults
    assert database.tenants["globex"].schema_name == "globex"


def test_environment_overrides_the_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_DATABASE__CLUSTERS__MAIN__PRIMARY", "postgresql://u@db.internal:6432/x")
    monkeypatch.setenv("APP_DATABASE__CLUSTERS__MAIN__POOL__SIZE", "11")
    main = load_settings().database.clusters["main"]
    assert (main.primary.host, main.primary.port, main.pool.size) == ("db.internal", 6432, 11)
    assert len(main.replicas) == 1  # the rest of the file still applies


def test_limits_turn_off_with_off_in_the_file_and_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TOML has no null and the environment is text: "off" is how they say None.
    config_file.write_text(
        GOOD.replace(
            "[database.clusters.main.pool]",
            '[database.clusters.main.pool]\nping_idle_after = "off"',
        )
        + '[database.routing]\nmax_replica_lag_seconds = "off"\nmax_replica_lag_bytes = "Off"\n'
    )
    monkeypatch.setenv("APP_DATABASE__DEAD_CONNECTION_TIMEOUT", "off")
    monkeypatch.setenv("APP_DATABASE__MAX_CONNECTIONS", "off")
    database = load_settings().database
    assert database.clusters["main"].pool.ping_idle_after is None
    assert database.routing.max_replica_lag_seconds is None
    assert database.routing.max_replica_lag_bytes is None
    assert database.dead_connection_timeout is None
    assert database.max_connections is None
    monkeypatch.setenv("APP_DATABASE__DEAD_CONNECTION_TIMEOUT", "never")
    with pytest.raises(ConfigError, match="dead_connection_timeout"):
        load_settings()


def test_init_arguments_override_everything(config_file: Path) -> None:
    settings = load_settings(
        database={
            "default_cluster": "main",
            "clusters": {"main": {"primary": "postgresql://u@h/override"}},
        }
    )
    assert settings.database.clusters["main"].primary.database == "override"


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        (
            ('primary = "postgresql+asyncpg://app', 'primary = "not a url'),
            "database.clusters.main.primary: not a valid URL",
        ),
        (
            ('primary = "postgresql+asyncpg://app', 'primary = "mysql://app'),
            "database.clusters.main.primary: not a PostgreSQL URL",
        ),
        (("size = 3", "size = -1"), "database.clusters.main.pool.size"),
        (("size = 3", "sise = 3"), "database.clusters.main.pool.sise: Extra inputs"),
        (('default_cluster = "main"', 'default_cluster = "nope"'), "database.default_cluster"),
        (('strategy = "schema"', 'strategy = "shard"'), "database.tenants.globex.strategy"),
        (("[database.tenants.acme]", "[database.tenants.ACME]"), "database.tenants.ACME"),
        (('schema = "globex"', 'schema = "bad-name;"'), "database.tenants.globex.schema"),
        (
            ('url = "postgresql+asyncpg://app:', 'cluster = "main"\nurl = "postgresql://app:'),
            "database.tenants.acme: give either url",
        ),
        # Storage that is not a tenant's own: reserved, shared, or claimed twice.
        (('schema = "globex"', 'schema = "public"'), "database.tenants.globex.schema: schema"),
        (('schema = "globex"', 'schema = "pg_catalog"'), "database.tenants.globex.schema"),
        (('schema = "globex"', 'schema = "globex\\n"'), "database.tenants.globex.schema"),
        (
            (
                'schema = "globex"',
                'schema = "co_op"\n[database.tenants.co-op]\nstrategy = "schema"',
            ),
            "database.tenants.co-op: its schema 'co_op' in database 'app' is already used",
        ),
        (
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.x]\nstrategy = "database"\ndatabase = "app"',
            ),
            "database.tenants.x: its database 'app' is already used by cluster main",
        ),
        (  # the same server as acme's own url, spelled through the cluster
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.x]\nstrategy = "database"\ndatabase = "acme"',
            ),
            "database.tenants.x: its database 'acme' is already used by acme",
        ),
        (
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.x]\nstrategy = "database"'
                f'\ndatabase = "{"d" * 64}"',
            ),
            "database.tenants.x.database: a database name is",
        ),
        (
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.x]\nstrategy = "database"'
                '\ndatabase = "template1"',
            ),
            "database.tenants.x.database: database 'template1' is reserved",
        ),
        (  # a schema named after the role the router connects as shadows "$user" paths
            ('schema = "globex"', 'schema = "globex"\n[database.tenants.app]\nstrategy = "schema"'),
            "database.tenants.app: schema 'app' is reserved (a role the router connects as)",
        ),
        (  # the default cluster's own database, spelled through another host name
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.x]\nstrategy = "database"'
                '\nurl = "postgresql://app@LOCALHOST:5432/app"',
            ),
            "database.tenants.x: its database 'app' is already used by cluster main",
        ),
        (
            (
                'schema = "globex"',
                'schema = "globex"\n[database.tenants.thief]\n'
                'strategy = "schema"\nschema = "globex"',
            ),
            "database.tenants.thief: its schema 'globex'",
        ),
    ],
)
def test_config_errors_name_the_key_and_hide_secrets(
    config_file: Path, patch: tuple[str, str], key: str
) -> None:
    config_file.write_text(GOOD.replace(*patch, 1))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert key in str(caught.value)
    assert SECRET not in str(caught.value)


def test_missing_named_config_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APP_CONFIG_FILE", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="APP_CONFIG_FILE"):
        load_settings()


def test_invalid_toml_is_a_config_error(config_file: Path) -> None:
    config_file.write_text("[database\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings()


def test_passwords_never_appear_in_reprs_or_dumps(config_file: Path) -> None:
    settings = load_settings()
    router = SessionRouter(settings.database)
    shown = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(router),
        repr(router.default_cluster),
        repr(router.default_cluster.primary),
        repr(router.cluster("@acme").primary),
        str(router.status()),
    ]
    for text in shown:
        assert SECRET not in text
    assert router.default_cluster.primary.url.password == SECRET  # but the engine has it


def test_router_rejects_bad_settings_at_construction(config_file: Path) -> None:
    database = load_settings().database
    broken = database.model_copy(update={"default_cluster": "missing"})
    with pytest.raises(ConfigError, match=r"database\.default_cluster"):
        SessionRouter(broken)
