"""The reference app's settings: the library's, read with the app's own names.

Sources, highest priority first: keyword arguments, environment variables with the `APP_`
prefix (`APP_DATABASE__CLUSTERS__MAIN__PRIMARY=...`), `.env`, the TOML file named by
`APP_CONFIG_FILE` (default `config/settings.toml`), defaults. A host application chooses its
own prefix and file with `pg_session_router.load_settings`; these names belong to this app.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pg_session_router.core.errors import ConfigError
from pg_session_router.core.settings import RouterSettings
from pg_session_router.core.validation import load_settings as load_router_settings

ENV_PREFIX = "APP_"
CONFIG_FILE_ENV = "APP_CONFIG_FILE"
DEFAULT_CONFIG_FILE = Path("config/settings.toml")


def config_file_path() -> Path | None:
    """The file named by `APP_CONFIG_FILE`, else the default one if it exists."""
    named = os.environ.get(CONFIG_FILE_ENV)
    if named:
        return Path(named)
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(**overrides: Any) -> RouterSettings:
    """Settings of the reference app; every problem is a `ConfigError` naming its key."""
    path = config_file_path()
    if path is not None and not path.is_file():
        raise ConfigError(f"{CONFIG_FILE_ENV}: file not found: {path}")
    return load_router_settings(path, env_prefix=ENV_PREFIX, **overrides)
