"""The reference app's migrations: its Alembic revisions, run on every target.

`python -m app migrate` (and `tenants add`, and the demo) use `app_migrations()`; revisions
live in `app/db/migrations/versions/`, one history for the default cluster and every tenant.
"""

from __future__ import annotations

from pathlib import Path

from app.core.config import load_settings
from pg_session_router.core.errors import MigrationError
from pg_session_router.migrations import (
    Action,
    AlembicMigrations,
    Baseline,
    TargetOutcome,
    migrate_targets,
)
from pg_session_router.migrations.runner import failed_labels

SCRIPT_LOCATION = Path(__file__).parent / "migrations"

#: What `create_all` made before Alembic: such targets are stamped at 0001, not recreated.
BASELINE = Baseline("0001_initial", {"items": frozenset({"id", "name", "tenant_id"})})


def app_migrations(*extra_version_locations: Path) -> AlembicMigrations:
    """The app's history; `extra_version_locations` add revision directories to it."""
    return AlembicMigrations(SCRIPT_LOCATION, tuple(extra_version_locations), BASELINE)


async def migrate_everything() -> list[TargetOutcome]:
    """Every target to head, as `python -m app migrate` does (the demo runs this);
    raises `MigrationError` naming the targets that failed."""
    outcomes = await migrate_targets(load_settings(), app_migrations(), Action())
    failed = failed_labels(outcomes)
    if failed:
        raise MigrationError("migrating failed: " + "; ".join(failed))
    return outcomes
