"""Running the reference app's command line (`python -m app ...`, `python -m app.scripts.X`)
as an operator would: a subprocess in the checkout, configured by a TOML file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.core.config import CONFIG_FILE_ENV

ROOT = Path(__file__).resolve().parent.parent.parent


def run_app(
    config: Path, *args: str, module: str = "app", timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> <args>` with `config` as the app's configuration file."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, CONFIG_FILE_ENV: str(config)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def toml_of(table: dict[str, Any], prefix: str = "") -> str:
    """A TOML document of nested dicts of strings, numbers, booleans and lists of strings
    (what the app's configuration files hold)."""
    scalars, tables = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append(toml_of(value, f"{prefix}.{key}" if prefix else key))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    header = [f"[{prefix}]"] if prefix and scalars else []
    return "\n".join([*header, *scalars, *tables]) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))
