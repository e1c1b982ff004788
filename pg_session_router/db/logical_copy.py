"""Copying one tenant's tables to another cluster with PostgreSQL logical replication.

The steps of a tenant move (`db/moves.py`) that talk to the servers directly, on asyncpg
connections of the move's own, made with each cluster's `admin` URL (PostgreSQL 15 lets only
superusers create subscriptions, and the source needs a role that may replicate):

- on the source: a publication of the tenant's tables (never `alembic_version`: each side
  keeps its own migration history), and at the switch a *fence*: a statement trigger on each
  of those tables that refuses every write with SQLSTATE 55R01. Creating a trigger takes a
  lock that conflicts with row writes, so the fence waits for the writes in flight and holds
  back new ones until it commits; once it has, nothing more can be written there, and the
  source's WAL position read right after is final.
- on the target: a subscription that copies the tables and then streams every change, its
  progress (tables copied, rows, bytes behind), and the position it has confirmed.

Tables need a primary key (or a replica identity): without one, PostgreSQL refuses UPDATE and
DELETE on a published table, so the move refuses them up front instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL

from pg_session_router.core.errors import MoveError
from pg_session_router.core.names import quote_identifier, quote_literal
from pg_session_router.db.driver_errors import TENANT_MOVED_SQLSTATE
from pg_session_router.db.tasks import connect_direct

APPLICATION_NAME = "session-router:move"
FENCE = "pgrouter_moved_fence"
_EXCLUDED_TABLES = ("alembic_version",)


def copy_name(tenant_id: str) -> str:
    """The publication's, subscription's and slot's name: ids may be 63 characters long,
    too long with a prefix for PostgreSQL's identifiers, so a digest stands in for them."""
    return "pgrouter_move_" + hashlib.sha256(tenant_id.encode()).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class Storage:
    """One side of a move: where the tenant's tables are, and how to reach them as admin."""

    admin_url: URL  # the cluster's admin URL, on the database holding the tables
    schema: str  # the tenant's schema, or "public" for a database tenant

    def table(self, name: str) -> str:
        return f"{quote_identifier(self.schema)}.{quote_identifier(name)}"


@dataclass(frozen=True, slots=True)
class CopyProgress:
    tables_ready: int
    tables: int
    rows: int  # rows the target has applied (statistics: up to a second behind)
    confirmed: int | None  # WAL position the target has flushed (None: not streaming yet)
    position: int  # the source's WAL position when this was read

    @property
    def copied(self) -> bool:
        return self.tables > 0 and self.tables_ready == self.tables

    def lag_bytes(self) -> int | None:
        return None if self.confirmed is None else max(0, self.position - self.confirmed)


async def connect(storage: Storage, connect_timeout: float) -> Any:
    return await connect_direct(
        storage.admin_url, connect_timeout=connect_timeout, application_name=APPLICATION_NAME
    )


async def tenant_tables(conn: Any, storage: Storage) -> list[str]:
    """The tenant's tables (sorted), refused if one could not be replicated or fenced."""
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relkind::text AS kind, c.relreplident::text AS identity,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
                   AS has_key,
               EXISTS (SELECT 1 FROM pg_inherits h WHERE c.oid IN (h.inhrelid, h.inhparent))
                   AS inherits
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> ALL($2::text[])
        ORDER BY c.relname
        """,
        storage.schema,
        list(_EXCLUDED_TABLES),
    )
    _refuse_unmovable(rows)
    return [r["relname"] for r in rows]


def _refuse_unmovable(rows: list[Any]) -> None:
    if not rows:
        raise MoveError("the tenant has no tables to move")
    # A statement on a parent does not fire its partitions' statement triggers: the fence
    # would not hold. Without a key, PostgreSQL refuses UPDATE and DELETE once published.
    nested = [r["relname"] for r in rows if r["kind"] == "p" or r["inherits"]]
    if nested:
        raise MoveError(f"partitioned or inherited tables cannot move online: {', '.join(nested)}")
    keyless = [
        r["relname"]
        for r in rows
        if r["identity"] == "n" or (r["identity"] == "d" and not r["has_key"])
    ]
    if keyless:
        raise MoveError(
            f"tables without a primary key cannot be moved online: {', '.join(keyless)} "
            "(add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL)"
        )


async def other_schemas(conn: Any, schema: str) -> list[str]:
    """Schemas other than `schema` holding tables (a database tenant moves `public` only)."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND n.nspname <> $1
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname NOT LIKE 'pg\\_%'
        ORDER BY 1
        """,
        schema,
    )
    return [r["nspname"] for r in rows]


async def row_counts(conn: Any, storage: Storage, tables: list[str]) -> dict[str, int]:
    return {t: await conn.fetchval(f"SELECT count(*) FROM {storage.table(t)}") for t in tables}


async def ensure_publication(conn: Any, name: str, storage: Storage, tables: list[str]) -> None:
    if await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", name):
        return
    listed = ", ".join(storage.table(t) for t in tables)
    await conn.execute(f"CREATE PUBLICATION {quote_identifier(name)} FOR TABLE {listed}")


#: libpq options carried from the admin URL's query string into the subscription's.
_CONNINFO_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl")


def conninfo(url: URL) -> str:
    """A libpq connection string for the subscription (it connects from the target's server
    to the source's, so the host must be one the target can reach). Stored by PostgreSQL in
    `pg_subscription`, readable by superusers only."""
    parts = {
        "host": url.host or "localhost",
        "port": str(url.port or 5432),
        "user": url.username or "",
        "dbname": url.database or "",
        "password": url.password or "",
    }
    for option in _CONNINFO_OPTIONS:
        value = url.query.get(option)
        if isinstance(value, str):
            parts[option] = value
    quoted = {k: v.replace("\\", "\\\\").replace("'", "\\'") for k, v in parts.items() if v}
    return " ".join(f"{key}='{value}'" for key, value in quoted.items())


async def ensure_subscription(conn: Any, name: str, source: Storage) -> None:
    if await conn.fetchval("SELECT 1 FROM pg_subscription WHERE subname = $1", name):
        return
    # The statement carries the source's password: keep it out of the server's log even
    # when it fails, and make sure the literal means what quote_literal assumes.
    await conn.execute(
        "SET log_min_error_statement = panic; SET log_statement = 'none'; "
        "SET standard_conforming_strings = on"
    )
    ident = quote_identifier(name)
    await conn.execute(
        f"CREATE SUBSCRIPTION {ident} CONNECTION {quote_literal(conninfo(source.admin_url))} "
        f"PUBLICATION {ident} WITH (copy_data = true)"
    )


async def subscription_exists(conn: Any, name: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_subscription WHERE subname = $1", name))


async def progress(
    source: Any, target: Any, name: str, storage: Storage, tables: list[str]
) -> CopyProgress:
    states = await target.fetch(
        """
        SELECT r.srsubstate::text AS srsubstate FROM pg_subscription_rel r
        JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1
        """,
        name,
    )
    rows = await target.fetchval(
        "SELECT coalesce(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables "
        "WHERE schemaname = $1 AND relname = ANY($2::text[])",
        storage.schema,
        tables,
    )
    position = await wal_position(source)
    confirmed = await confirmed_position(source, name)
    ready = sum(1 for state in states if state["srsubstate"] == "r")
    return CopyProgress(ready, len(tables), int(rows), confirmed, position)


async def confirmed_position(source: Any, name: str) -> int | None:
    """How far the target has applied and flushed the source's WAL (its slot's confirmed
    position: what the source would resend after a crash of the target starts there)."""
    confirmed = await source.fetchval(
        "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots "
        "WHERE slot_name = $1",
        name,
    )
    return None if confirmed is None else int(confirmed)


async def fence(
    conn: Any, storage: Storage, tables: list[str], tenant_id: str, lock_timeout: float
) -> None:
    """Refuse every write to the old storage from now on (see the module docstring)."""
    function = f"{quote_identifier(storage.schema)}.{FENCE}"
    message = quote_literal(f"tenant {tenant_id} has moved to another cluster")
    async with conn.transaction():
        # Every table's lock in one statement, bounded as a whole by the pause (lock_timeout
        # alone would allow one pause per table); the triggers then wait for nothing.
        await conn.execute(f"SET LOCAL statement_timeout = '{int(lock_timeout * 1000)}ms'")
        listed = ", ".join(storage.table(t) for t in tables)
        await conn.execute(f"LOCK TABLE {listed} IN SHARE ROW EXCLUSIVE MODE")
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute(
            f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$BEGIN RAISE EXCEPTION {message} "
            f"USING ERRCODE = '{TENANT_MOVED_SQLSTATE}'; END$$"
        )
        for table in tables:
            await conn.execute(
                f"CREATE OR REPLACE TRIGGER {FENCE} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE"
                f" ON {storage.table(table)} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            )


async def unfence(conn: Any, storage: Storage) -> None:
    """Remove the fence wherever it is (whatever tables the schema holds now)."""
    triggers = await conn.fetch(
        """
        SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = $1 AND n.nspname = $2
        """,
        FENCE,
        storage.schema,
    )
    async with conn.transaction():
        for row in triggers:
            await conn.execute(f"DROP TRIGGER IF EXISTS {FENCE} ON {storage.table(row['relname'])}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {quote_identifier(storage.schema)}.{FENCE}()")


async def wal_position(conn: Any) -> int:
    """The insert position: it covers every commit made so far, asynchronous ones included
    (the write position may lag behind those)."""
    lsn = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint")
    return int(lsn)


async def wait_confirmed(source: Any, name: str, position: int, within: float) -> bool:
    """Until the target has applied and flushed the source's WAL up to `position`."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        confirmed = await confirmed_position(source, name)
        if confirmed is not None and confirmed >= position:
            return True
        await asyncio.sleep(0.01)
    return False


async def copy_sequences(source: Any, target: Any, storage: Storage) -> int:
    """Advance the target's sequences past the source's (logical replication copies rows,
    not sequences): the next id the tenant gets on the target is one it never had."""
    query = "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = $1"
    advanced = 0
    for row in await source.fetch(query, storage.schema):
        if row["last_value"] is None:
            continue
        sequence = storage.table(row["sequencename"])
        await target.execute(
            f"SELECT setval($1::regclass, GREATEST($2::bigint, "
            f"(SELECT last_value FROM {sequence})), true)",
            sequence,
            row["last_value"],
        )
        advanced += 1
    return advanced


async def table_bytes(conn: Any, storage: Storage, tables: list[str]) -> int:
    total = await conn.fetchval(
        "SELECT coalesce(sum(pg_total_relation_size(t::regclass)), 0)::bigint "
        "FROM unnest($1::text[]) AS t",
        [storage.table(t) for t in tables],
    )
    return int(total)


async def drop_subscription(conn: Any, name: str) -> None:
    # Also drops its replication slot on the source (which must be reachable).
    await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {quote_identifier(name)}")


async def drop_publication(conn: Any, name: str) -> None:
    await conn.execute(f"DROP PUBLICATION IF EXISTS {quote_identifier(name)}")
