"""The README's set-up commands stay true: CI runs exactly the documented test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv .venv && ")]


def test_readme_has_a_demo_and_a_test_command() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python -m app demo")
    assert commands[1].endswith(".venv/bin/pytest")


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
