"""The body of an application's Alembic `env.py`, for every way Alembic is run:

- by `migrate_targets` (online): the target's connection, already inside its transaction
  with its lock and search path, is in `config.attributes["connection"]`;
- offline (`--dry-run`, `alembic upgrade --sql`): SQL is written, nothing connects;
- on its own (`migrate revision --autogenerate`, or the `alembic` command with an
  `alembic.ini` naming the app's script location): the default cluster's primary only, from
  the application's settings, through an async engine. No stamping, no catalog, no tenants:
  `migrate_targets` does those.

A schema target's version table lives in its own schema (`version_table_schema`), and its
unqualified names resolve there (search path), so one revision history serves every target.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from alembic import context as alembic_context
from alembic.environment import EnvironmentContext
from sqlalchemy import Connection, MetaData
from sqlalchemy.schema import SchemaItem

from pg_session_router.core.settings import RouterSettings
from pg_session_router.db.catalog import catalog_metadata
from pg_session_router.db.migrate import default_target, search_path_statement, target_connection
from pg_session_router.db.router import SessionRouter


def run_migrations(
    target_metadata: MetaData, *, load_settings: Callable[[], RouterSettings]
) -> None:
    """Call from `env.py`, where Alembic's `context` is the environment being run."""
    context = cast(EnvironmentContext, alembic_context)
    attributes = context.config.attributes
    schema = attributes.get("schema")
    options: dict[str, Any] = {
        "target_metadata": target_metadata,
        "version_table_schema": schema,
        "include_object": _application_tables,
        "compare_type": True,
    }
    if context.is_offline_mode():
        context.configure(dialect_name="postgresql", literal_binds=True, **options)
        with context.begin_transaction():
            context.execute(search_path_statement(schema))
            context.run_migrations()
    elif (connection := attributes.get("connection")) is not None:
        _run_on(connection, context, options)
    else:
        asyncio.run(_run_standalone(context, load_settings(), options))


def _run_on(connection: Connection, context: EnvironmentContext, options: dict[str, Any]) -> None:
    context.configure(connection=connection, **options)
    # Inside the caller's transaction this opens none: the target commits or rolls back whole.
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(
    context: EnvironmentContext, settings: RouterSettings, options: dict[str, Any]
) -> None:
    router = SessionRouter.from_settings(settings)
    try:
        async with target_connection(router, default_target(router)) as conn:
            await conn.run_sync(_run_on, context, options)
    finally:
        await router.dispose()


def _application_tables(
    item: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate compares the application's tables only: the router owns its catalog
    (its tables and their indexes)."""
    if type_ == "index":
        table = getattr(item, "table", None)
        return table is None or table.name not in catalog_metadata.tables
    return not (type_ == "table" and name in catalog_metadata.tables)
