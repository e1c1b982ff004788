"""Running the reference app's command line (`python -m app ...`, `python -m app.scripts.X`)
as an operator would: a subprocess in the checkout, configured by a TOML file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
