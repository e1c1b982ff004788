"""The `tenants` catalog table on the default cluster's primary, and reading it safely.

A serving process looks tenants up by id (`lookup`, a batch of ids per query), so what it
reads and holds does not grow with the catalog; tools that need every tenant (migrations,
backfills) read it whole (`load`), and listings page through it (`page`). Every row goes
through the same validation as a tenant of the configuration file (`TenantSettings`,
`check_tenant`) and the storage-ownership rules (`core.storage`); a row that fails any of
them is logged and skipped, never routable. A looked-up row is checked against the rows that
could claim the same storage (same schema name, same database name, a whole database or
server of its own, the tenants of a cluster whose database it would take), and theirs in
turn, a few indexed queries (an index per arm; only rows with a server of their own are all
read), so a row inserted by hand that collides with an older tenant is refused as a whole read
would refuse it (ties of creation time broken by id, by code point, in both).
Row-level security hides the table from every transaction that has a tenant, so no tenant's
session can read other tenants' placements.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    MetaData,
    Select,
    Table,
    Text,
    all_,
    and_,
    any_,
    func,
    literal,
    null,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from pg_session_router.core.errors import RouterError
from pg_session_router.core.names import validate_tenant_id
from pg_session_router.core.settings import (
    DatabaseSettings,
    TenantSettings,
    format_validation_error,
)
from pg_session_router.core.storage import ClaimIndex, claim_of, cluster_claims
from pg_session_router.core.validation import check_tenant

logger = logging.getLogger(__name__)

catalog_metadata = MetaData()
tenants_table = Table(
    "tenants",
    catalog_metadata,
    Column("id", Text, primary_key=True),
    Column("strategy", Text, nullable=False),
    Column("cluster", Text),
    Column("url", Text),
    Column("database", Text),
    Column("schema", Text),
    Column("active", Boolean, nullable=False, server_default=true()),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("strategy IN ('database', 'schema', 'row')", name="tenants_strategy"),
)
# What a lookup's conflict check searches by (`_rivals`): storage named like the tenant's.
# One index per arm of its OR, so that the planner combines them and never reads the table
# (row-level security only lets leakproof operators, such as text equality, reach an index:
# the schema a row claims by default, replace(id, '-', '_'), is matched through its ids).
_SCHEMA_CLAIMED = func.coalesce(tenants_table.c.schema, func.replace(tenants_table.c.id, "-", "_"))
#: Past this many underscores, the ids that spell a schema are too many to list.
_MAX_SPELLINGS_UNDERSCORES = 8
#: Rounds of rivals of rivals a lookup reads (a chain of claims is rarely longer than two).
_RIVAL_ROUNDS = 3
Index("tenants_schema", tenants_table.c.schema)
Index("tenants_database", tenants_table.c.database)
Index("tenants_own_server", tenants_table.c.id, postgresql_where=tenants_table.c.url.is_not(None))
Index(
    "tenants_whole_cluster",
    tenants_table.c.id,
    postgresql_where=and_(
        tenants_table.c.strategy == "database", tenants_table.c.database.is_(None)
    ),
)
Index("tenants_cluster", tenants_table.c.cluster)

#: Each tenant's last commit position, for `http.consistency_memory = "shared"`
#: (`db/last_writes.py`).
last_writes_table = Table(
    "router_last_writes",
    catalog_metadata,
    Column("key", Text, primary_key=True),
    Column("stream", Text, nullable=False),
    Column("lsn", BigInteger, nullable=False),
)

#: Online moves of catalogued tenants to another cluster (`db/moves.py`), one row per tenant
#: from the start of its move until `tenants drop-moved` (or `--abort`).
tenant_moves_table = Table(
    "router_tenant_moves",
    catalog_metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("source_cluster", Text, nullable=False),
    Column("target_cluster", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("rows_copied", BigInteger),
    Column("bytes_copied", BigInteger),
    Column("write_pause_ms", BigInteger),
    CheckConstraint("state IN ('copying', 'paused', 'moved')", name="tenant_moves_state"),
)

SETTING_COLUMNS = ("strategy", "cluster", "url", "database", "schema", "active")


def tenant_of_row(row: Mapping[Any, Any]) -> TenantSettings:
    return TenantSettings.model_validate(
        {key: row[key] for key in SETTING_COLUMNS if row[key] is not None}
    )


def valid_row(database: DatabaseSettings, row: Mapping[Any, Any]) -> TenantSettings | None:
    """The row's tenant if it is valid on its own (not a configured id); else None."""
    tenant_id = validate_tenant_id(row["id"])
    if tenant_id in database.tenants:
        return None  # the configuration file is the source of truth for its tenants
    tenant = tenant_of_row(row)
    check_tenant(database, tenant_id, tenant)
    return tenant


def accepted_rows(
    database: DatabaseSettings,
    rows: Sequence[Mapping[Any, Any]],
    warn_for: Collection[str] | None = None,
) -> dict[str, TenantSettings]:
    """The rows that are valid tenants and claim storage nobody else claims (oldest first).
    `warn_for`: log only these ids' refusals (a lookup reads other rows to check one)."""
    valid: dict[str, TenantSettings] = {}
    for row in rows:
        warn = warn_for is None or row["id"] in warn_for
        try:
            tenant = valid_row(database, row)
        except Exception as exc:  # one bad row must not take the others down
            if warn:
                logger.warning("catalog row ignored: %s", _why(exc))
            continue
        if tenant is None:
            continue
        tenant_id = row["id"]
        valid[tenant_id] = tenant
    every = {**database.tenants, **valid}
    index = ClaimIndex(cluster_claims(database, every))
    for tenant_id, tenant in database.tenants.items():
        index.add(claim_of(database, tenant_id, tenant))
    accepted: dict[str, TenantSettings] = {}
    for tenant_id, tenant in valid.items():
        claim = claim_of(database, tenant_id, tenant)
        other = index.conflict(claim)
        if other is not None:
            if warn_for is not None and tenant_id not in warn_for:
                continue
            logger.warning(
                "catalog row ignored: %s: its %s is already used by %s",
                tenant_id,
                claim.describe(),
                other.owner,
            )
            continue
        index.add(claim)
        accepted[tenant_id] = tenant
    return accepted


def _why(exc: Exception) -> str:
    # Name fields and rules, never the row's values (a URL may hold a password).
    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    if isinstance(exc, ValueError | RouterError):
        return str(exc).splitlines()[0]
    return type(exc).__name__


class TenantCatalog:
    """Reads the `tenants` table; writes go through `pg_session_router.db.provisioning`."""

    def __init__(self, engine: Callable[[], AsyncEngine], database: DatabaseSettings) -> None:
        self._engine = engine
        self._database = database
        #: Whole reads of the catalog (`load`).
        self.loads = 0
        #: Lookups by id (`lookup`), each one batch of ids.
        self.lookups = 0
        self._has_moves = False

    async def lookup(
        self, ids: Collection[str]
    ) -> tuple[dict[str, TenantSettings], dict[str, str]]:
        """The accepted tenants among `ids`, and their moves under way (see `load`)."""
        self.lookups += 1
        async with self._engine().connect() as connection:
            query = (await self._with_moves(connection)).where(tenants_table.c.id == _any(ids))
            found = (await connection.execute(query)).mappings().all()
            rivals = await self._rivals(connection, found)
        rows = sorted([*found, *rivals], key=lambda r: (r["created_at"], r["id"]))
        accepted = accepted_rows(self._database, rows, warn_for=set(ids))
        return {t: accepted[t] for t in ids if t in accepted}, _moving(found)

    async def _rivals(
        self, connection: AsyncConnection, found: Sequence[Mapping[Any, Any]]
    ) -> list[Mapping[Any, Any]]:
        """Rows other than `found` that could claim storage one of `found` claims, and the
        rows that could claim theirs (a rival may itself lose to an older row: a few rounds
        reach every row a whole read would weigh)."""
        seen = {row["id"] for row in found}
        rivals: list[Mapping[Any, Any]] = []
        frontier: Sequence[Mapping[Any, Any]] = found
        for _ in range(_RIVAL_ROUNDS):
            arms = self._claims_arms(frontier)
            if not arms:
                break
            query = select(tenants_table).where(or_(*arms), tenants_table.c.id != _all(seen))
            frontier = (await connection.execute(query)).mappings().all()
            if not frontier:
                break
            rivals.extend(frontier)
            seen.update(row["id"] for row in frontier)
        return rivals

    def _claims_arms(self, rows: Sequence[Mapping[Any, Any]]) -> list[ColumnElement[bool]]:
        """What finds the rows whose storage could collide with `rows`' (one indexed arm each:
        row-level security only lets leakproof operators, such as text equality, reach an
        index, so the default schema names are matched through the ids that spell them)."""
        claims = []
        for row in rows:
            tenant = _valid_or_none(self._database, row)
            if tenant is not None:
                claims.append(claim_of(self._database, row["id"], tenant))
        if not claims:
            return []
        t = tenants_table.c
        arms = [
            t.url.is_not(None),  # a server of its own: compared by server in accepted_rows
            and_(t.strategy == "database", t.database.is_(None)),  # a whole cluster's database
            and_(t.strategy == "database", t.database == _any(c.database for c in claims)),
        ]
        schemas = {c.schema for c in claims if c.schema is not None}
        if schemas:
            arms.append(and_(t.strategy == "schema", _claiming_schemas(schemas)))
        # A whole database claimed: the schema and row tenants of every configured cluster
        # whose own database it is (by server and name, whatever the clusters are called).
        wholes = {(c.server, c.database) for c in claims if c.kind == "database"}
        names = [
            claim.owner.removeprefix("cluster ")
            for claim in cluster_claims(self._database, {})
            if (claim.server, claim.database) in wholes
        ]
        if names:
            on_cluster = t.cluster == _any(names)
            if self._database.default_cluster in names:
                on_cluster = or_(on_cluster, t.cluster.is_(None))
            arms.append(and_(t.strategy != "database", on_cluster))
        return arms

    async def page(self, after: str | None, limit: int) -> list[tuple[str, TenantSettings | None]]:
        """Up to `limit` rows with ids after `after`, by id; None for a row that is not
        routable (judged as a serving process judges it: by lookup, against its rivals)."""
        query = select(tenants_table.c.id).order_by(tenants_table.c.id).limit(limit)
        if after is not None:
            query = query.where(tenants_table.c.id > after)
        async with self._engine().connect() as connection:
            ids = list((await connection.execute(query)).scalars())
        accepted, _ = await self.lookup(ids) if ids else ({}, {})
        return [(tenant_id, accepted.get(tenant_id)) for tenant_id in ids]

    async def _with_moves(self, connection: AsyncConnection) -> Select[Any]:
        """The catalog's rows with the state of their moves, in one statement: read apart, a
        read overlapping a move's switch could see the old cluster with the new state."""
        if not self._has_moves:  # a catalog that predates moves has no such table yet
            self._has_moves = await _has_moves_table(connection)
        if not self._has_moves:
            return select(tenants_table, null().label("move_state"))
        moves = tenant_moves_table
        joined = tenants_table.outerjoin(moves, moves.c.tenant_id == tenants_table.c.id)
        return select(tenants_table, moves.c.state.label("move_state")).select_from(joined)

    async def load(self) -> tuple[dict[str, TenantSettings], dict[str, str]]:
        """Every accepted tenant, and the state of each move (tenant id -> state)."""
        self.loads += 1
        async with self._engine().connect() as connection:
            # Ties broken by code point, as a lookup sorts them (not by the collation).
            query = (await self._with_moves(connection)).order_by(
                tenants_table.c.created_at, tenants_table.c.id.collate("C")
            )
            rows = (await connection.execute(query)).mappings().all()
        return accepted_rows(self._database, rows), _moving(rows)


def _moving(rows: Sequence[Mapping[Any, Any]]) -> dict[str, str]:
    return {row["id"]: row["move_state"] for row in rows if row["move_state"]}


def _any(values: Iterable[str]) -> ColumnElement[Any]:
    """`= ANY($1)`: one array parameter, however many values (asyncpg takes 32,767)."""
    return any_(literal(sorted(set(values)), ARRAY(Text)))


def _all(values: Iterable[str]) -> ColumnElement[Any]:
    return all_(literal(sorted(set(values)), ARRAY(Text)))


def _claiming_schemas(schemas: Collection[str]) -> ColumnElement[bool]:
    """Rows that claim one of `schemas`: by name, or by default through an id spelled like
    it (`co-op` and `co_op` both claim `co_op`)."""
    t = tenants_table.c
    spellings: list[str] = []
    unlisted: list[str] = []
    for schema in schemas:
        spelled = _ids_spelling(schema)
        if spelled is None:
            unlisted.append(schema)
        else:
            spellings.extend(spelled)
    by_default = [t.id == _any(spellings)] if spellings else []
    # Too many spellings to list: the complete check, without an index (rare names).
    by_default += [_SCHEMA_CLAIMED == name for name in unlisted]  # noqa: SIM300
    return or_(t.schema == _any(schemas), and_(t.schema.is_(None), or_(*by_default)))


def _ids_spelling(schema: str) -> list[str] | None:
    """Every id whose default schema name is `schema` ('-' or '_' at each '_'), or None
    when there are too many to list."""
    parts = schema.split("_")
    if len(parts) - 1 > _MAX_SPELLINGS_UNDERSCORES:
        return None
    spellings = [parts[0]]
    for part in parts[1:]:
        spellings = [f"{head}{sep}{part}" for head in spellings for sep in ("-", "_")]
    return spellings


def _valid_or_none(database: DatabaseSettings, row: Mapping[Any, Any]) -> TenantSettings | None:
    try:
        return valid_row(database, row)
    except Exception:  # refused on its own: `accepted_rows` says why
        return None


async def _has_moves_table(connection: AsyncConnection) -> bool:
    # A deployment whose catalog predates moves has no such table yet: no move under way.
    found = await connection.scalar(text(f"SELECT to_regclass('{tenant_moves_table.name}')"))
    return found is not None
