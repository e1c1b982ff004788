"""What to migrate with, and what to do: configuration and results, no I/O.

Every object here is small and picklable: worker processes receive the configuration and
the action, and send outcomes back.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alembic.config import Config

from pg_session_router.db.migrate import MigrationTarget


@dataclass(frozen=True, slots=True)
class Baseline:
    """An existing deployment made before Alembic (by `create_all`): a target that holds
    exactly these tables and columns but no version table is stamped at `revision` and
    upgraded from there, not created again. A target holding only some of them, or a table
    with other columns, is refused: stamping it would hide a difference."""

    revision: str
    tables: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class AlembicMigrations:
    """Where an application's revisions live. `version_locations`: further directories of
    revisions beside `script_location/versions` (one history across them)."""

    script_location: Path
    version_locations: tuple[Path, ...] = ()
    baseline: Baseline | None = None

    def alembic_config(self, **attributes: Any) -> Config:
        """A fresh Alembic `Config` (one per target: `attributes` carry its connection)."""
        config = Config(output_buffer=io.StringIO())
        # Options are interpolated (ConfigParser): a literal % must be doubled.
        config.set_main_option("script_location", str(self.script_location).replace("%", "%%"))
        config.set_main_option("path_separator", "os")
        if self.version_locations:
            locations = [self.script_location / "versions", *self.version_locations]
            joined = os.pathsep.join(map(str, locations)).replace("%", "%%")
            config.set_main_option("version_locations", joined)
        config.attributes.update(attributes)
        return config


Kind = Literal["upgrade", "downgrade", "current"]


@dataclass(frozen=True, slots=True)
class Action:
    """`upgrade` or `downgrade` to `revision` (`sql`: print the SQL, change nothing), or
    read each target's `current` revision."""

    kind: Kind = "upgrade"
    revision: str = "head"
    sql: bool = False
    #: Seconds a statement waits for a table lock before the target fails (and the rest of
    #: its transaction with it), so that a migration queued behind a long transaction does
    #: not stall that tenant's traffic behind it. None: wait as long as it takes.
    lock_timeout: float | None = 10.0

    @property
    def writes(self) -> bool:
        return self.kind != "current" and not self.sql


Result = Literal["upgraded", "downgraded", "stamped", "unchanged", "current", "planned", "failed"]


@dataclass(frozen=True, slots=True)
class TargetOutcome:
    target: MigrationTarget
    result: Result
    #: Revisions before and after (None: no version table; several heads joined by ",").
    before: str | None = None
    after: str | None = None
    seconds: float = 0.0
    #: One line, no secret; the target's transaction was rolled back.
    error: str | None = None
    #: Dry runs: the SQL that would run.
    sql: str | None = field(default=None, repr=False)

    @property
    def failed(self) -> bool:
        return self.result == "failed"
