"""Alembic across every target: the default cluster, each schema tenant, each database tenant.

    from pg_session_router.migrations import AlembicMigrations, Action, migrate_targets

`AlembicMigrations` says where the application's revisions are (configuration);
`migrate_targets` runs one `Action` (upgrade, downgrade, current, or a dry run of either) on
every selected target and reports one `TargetOutcome` each. A target failing never stops the
others. The application's `env.py` hands its metadata to `env.run_migrations`. Needs the
`migrations` extra (Alembic).
"""

from pg_session_router.migrations.plan import Action, AlembicMigrations, Baseline, TargetOutcome
from pg_session_router.migrations.runner import alembic_migrator, migrate_targets

__all__ = [
    "Action",
    "AlembicMigrations",
    "Baseline",
    "TargetOutcome",
    "alembic_migrator",
    "migrate_targets",
]
