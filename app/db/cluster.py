"""`Node` and `Cluster`: the runtime objects behind a cluster's configuration.

A node is one database on one server, with its own `AsyncEngine` (and so its own pool) and two
session factories built once: plain, and READ ONLY (for reads served by a primary; a replica
refuses writes by itself). Building them here, once, keeps the per-session path to a few
attribute reads and a constructor call.

A cluster chooses nodes from what the health monitor knows: the writer is the node whose server
is up and not in recovery (the configured primary until a probe says otherwise, so a promoted
replica takes over without a restart); readers are replicas that are up and fresh enough,
picked by the cluster's policy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, TextClause, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.util import await_only

from app.core.config import ClusterSettings, PoolSettings, RoutingSettings
from app.db.balancing import POLICIES, ReplicaPolicy
from app.db.consistency import WAL_POSITION_SQL
from app.db.errors import CrossTenantError
from app.db.health import HealthMonitor, ServerHealth

logger = logging.getLogger(__name__)

Role = Literal["primary", "replica"]
_O = TypeVar("_O", bound=object)


class RoutedSession(Session):
    """The sync session behind every routed `AsyncSession`; one tenant for its whole life.

    `transaction_setup` is the statement run at the start of every transaction for tenants placed
    by schema or by row (see `app.db.tenancy`); it is None for everything else, so the event
    listener that reads it costs one attribute lookup on the common path. `tenant_id` marks every
    object the session loads or saves, and objects marked for another tenant are refused.
    """

    transaction_setup: tuple[TextClause, dict[str, Any]] | None = None
    tenant_id: str | None = None
    #: Set around a COMMIT whose WAL position is wanted (a consistency token): the connection
    #: to read it on, after the COMMIT but before the connection goes back to the pool.
    position_connection: Connection | None = None
    #: The WAL position read after the last such COMMIT, or None if it could not be read.
    committed_position: int | None = None

    def merge(self, instance: _O, *args: Any, **kwargs: Any) -> _O:
        _refuse_foreign(self, instance)
        return super().merge(instance, *args, **kwargs)


def _refuse_foreign(session: RoutedSession, instance: object) -> None:
    owner = instance_state(instance).info.get("tenant")
    if owner is not None and owner != session.tenant_id:
        raise CrossTenantError(
            f"an object of tenant {owner!r} cannot join a session of "
            f"{session.tenant_id or 'no tenant'!r}: sessions never mix tenants"
        )


@event.listens_for(RoutedSession, "before_attach")
def _check_attach(session: RoutedSession, instance: object) -> None:
    _refuse_foreign(session, instance)


@event.listens_for(RoutedSession, "loaded_as_persistent")
@event.listens_for(RoutedSession, "pending_to_persistent")
def _mark_tenant(session: RoutedSession, instance: object) -> None:
    # Runs for every loaded object of every session: the cheapest possible (no `inspect()`,
    # which goes through the inspection registry).
    tenant = session.tenant_id
    if tenant is not None:
        instance_state(instance).info["tenant"] = tenant


@event.listens_for(RoutedSession, "after_begin")
def _run_transaction_setup(
    session: RoutedSession, transaction: SessionTransaction, connection: Connection
) -> None:
    # Runs inside the transaction that just began, before any statement of the caller's, so
    # ORM statements and raw text() alike see only the tenant's schema or rows.
    setup = session.transaction_setup
    if setup is not None:
        connection.execute(setup[0], setup[1])


@event.listens_for(RoutedSession, "after_commit")
def _read_commit_position(session: RoutedSession) -> None:
    # after_commit runs once the COMMIT succeeded and while the session still holds the
    # connection: the position is read there on the asyncpg connection itself, outside any
    # transaction (no BEGIN, no pool checkout). One attribute read for every other commit.
    connection = session.position_connection
    if connection is None:
        return
    session.committed_position = None
    try:
        driver = connection.connection.driver_connection
        if driver is not None:  # None only if the connection was invalidated meanwhile
            session.committed_position = int(await_only(driver.fetchval(WAL_POSITION_SQL)))
    except Exception:
        # The write is committed: failing to read its position must not turn it into an error.
        logger.warning("no consistency token after a committed write", exc_info=True)


def _discard_closed_connections(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Pool checkout hook: a connection the server already closed is never handed out.

    When a server restarts or terminates our backends, it closes the sockets, and asyncpg marks
    those connections closed as soon as the event loop reads the EOF. Checking that flag costs
    nothing (no round trip, unlike pre-ping). Raising InvalidatePoolError makes SQLAlchemy
    discard every connection pooled before now (after a restart they are all dead) and connect
    afresh, exactly as its own pre-ping does on a failed ping.
    """
    driver = dbapi_connection.driver_connection
    if driver is not None and driver.is_closed():
        raise InvalidatePoolError("the server closed this pooled connection")


class Node:
    """One database on one server: an engine, its pool, and the session factories over it."""

    def __init__(
        self,
        name: str,
        configured_role: Role | None,
        url: URL,
        pool: PoolSettings,
        *,
        health: ServerHealth,
        connect_timeout: float,
        weight: int = 1,
    ) -> None:
        self.name = name
        self.configured_role = configured_role
        self.url = url
        self.health = health
        self.weight = weight
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=pool.size,
            max_overflow=pool.max_overflow,
            pool_timeout=pool.timeout,
            pool_recycle=pool.recycle,
            pool_pre_ping=pool.pre_ping,
            connect_args={
                # asyncpg's `timeout` bounds TCP connect plus the startup handshake.
                "timeout": connect_timeout,
                "server_settings": {"application_name": f"session-router:{name}"},
            },
        )
        event.listen(self.engine.sync_engine, "checkout", _discard_closed_connections)
        # Same pool; BEGIN becomes BEGIN READ ONLY. SQLAlchemy resets the flag on return.
        readonly_engine = self.engine.execution_options(postgresql_readonly=True)
        self.session_factory = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=RoutedSession
        )
        self.readonly_session_factory = async_sessionmaker(
            readonly_engine, expire_on_commit=False, sync_session_class=RoutedSession
        )

    @property
    def role(self) -> Role | None:
        """The role the server has now (from the last probe), else the configured one."""
        in_recovery = self.health.in_recovery
        if in_recovery is None:
            return self.configured_role
        return "replica" if in_recovery else "primary"

    @property
    def writable(self) -> bool:
        return self.health.up and self.role == "primary"

    @property
    def readable_replica(self) -> bool:
        health = self.health
        return health.up and health.fresh and self.role == "replica"

    def factory(self, read_only: bool) -> async_sessionmaker[AsyncSession]:
        """Writes: read-write. Reads on a replica: plain too, since a hot standby refuses
        writes by itself (and BEGIN READ ONLY would cost a little on every read). Reads on a
        primary: READ ONLY transactions."""
        if read_only and self.role != "replica":
            return self.readonly_session_factory
        return self.session_factory

    def in_use(self) -> int:
        checked_out = getattr(self.engine.pool, "checkedout", None)
        return int(checked_out()) if callable(checked_out) else 0

    def pool_status(self) -> dict[str, int]:
        size = getattr(self.engine.pool, "size", None)
        return {"in_use": self.in_use(), "size": int(size()) if callable(size) else 0}

    async def dispose(self) -> None:
        await self.engine.dispose()

    def __repr__(self) -> str:
        # URL renders with the password masked; never print the raw string.
        return f"<Node {self.name} {self.role} {self.url!r}>"


class Cluster:
    """A primary and its replicas. Chooses the node for a unit of work."""

    def __init__(
        self, name: str, nodes: Sequence[Node], policy: ReplicaPolicy, *, fallback_to_primary: bool
    ) -> None:
        self.name = name
        self.nodes = tuple(nodes)
        self.policy = policy
        self.fallback_to_primary = fallback_to_primary
        #: Sessions open on this cluster's nodes (an idle tenant cluster may be evicted).
        self.in_flight = 0
        #: Set when this tenant cluster is about to be evicted: new sessions wait for a new one.
        self.draining = False

    @classmethod
    def from_settings(
        cls,
        name: str,
        settings: ClusterSettings,
        *,
        monitor: HealthMonitor,
        routing: RoutingSettings,
        connect_timeout: float,
        database: str | None = None,
        pool: PoolSettings | None = None,
    ) -> Cluster:
        """Build the cluster; `database` swaps the database name on every node (tenants)."""

        def node(node_name: str, role: Role | None, url: URL, weight: int = 1) -> Node:
            if database is not None:
                url = url.set(database=database)
            return Node(
                node_name,
                role,
                url,
                pool or settings.pool,
                health=monitor.server(url),
                connect_timeout=connect_timeout,
                weight=weight,
            )

        nodes: list[Node] = []
        if settings.primary is not None:
            nodes.append(node(f"{name}.primary", "primary", settings.primary))
        for i, replica in enumerate(settings.replicas, start=1):
            nodes.append(node(f"{name}.replica{i}", "replica", replica.url, replica.weight))
        for i, url in enumerate(settings.nodes, start=1):
            nodes.append(node(f"{name}.node{i}", None, url))
        policy = POLICIES[routing.policy]()
        return cls(name, nodes, policy, fallback_to_primary=routing.fallback_to_primary)

    @property
    def primary(self) -> Node:
        """The current writer, else the configured primary, else the first node."""
        writer = self.writer()
        if writer is not None:
            return writer
        configured = [node for node in self.nodes if node.configured_role == "primary"]
        return (configured or list(self.nodes))[0]

    @property
    def replicas(self) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if node.role == "replica")

    def writer(self) -> Node | None:
        for node in self.nodes:
            if node.writable:
                return node
        return None

    def reader(self, min_lsn: int | None = None) -> Node | None:
        """A fresh, healthy replica by the policy; else the writer if falling back is allowed.

        With `min_lsn` (read-your-writes), only replicas known to have replayed that far; the
        primary always has, so it serves the read when none has (whatever the fallback rule).
        """
        candidates = [node for node in self.nodes if node.readable_replica]
        if min_lsn is not None:
            candidates = [
                n for n in candidates if n.health.lsn is not None and n.health.lsn >= min_lsn
            ]
            if not candidates:
                return self.writer()
        if candidates:
            return self.policy.choose(candidates)
        return self.writer() if self.fallback_to_primary else None

    async def dispose(self) -> None:
        for node in self.nodes:
            await node.dispose()

    def __repr__(self) -> str:
        return f"<Cluster {self.name} nodes={[node.name for node in self.nodes]}>"
