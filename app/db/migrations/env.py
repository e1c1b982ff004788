"""Alembic environment of the reference app: its models, run on every target by the router.

`python -m app migrate` runs it once per target (the default cluster, each schema tenant,
each database tenant) on a connection it hands over; `alembic` run by hand or
`python -m app migrate revision --autogenerate` reach the default cluster's primary through
an async engine from the app's settings. See `pg_session_router.migrations.env`.
"""

from app.core.config import load_settings
from app.models import Base
from pg_session_router.migrations.env import run_migrations

run_migrations(Base.metadata, load_settings=load_settings)
