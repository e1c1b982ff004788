"""`Node` and `Cluster`: the runtime objects behind a cluster's configuration.

A node is one PostgreSQL endpoint with its own `AsyncEngine` (and so its own pool) and two
session factories built once: read-write, and READ ONLY (used when a read falls back to a
primary). Building them here, once, keeps the per-session path to a dictionary lookup and a
constructor call.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Connection, TextClause, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, SessionTransaction

from app.core.config import ClusterSettings, PoolSettings

Role = Literal["primary", "replica"]


class RoutedSession(Session):
    """The sync session behind every routed `AsyncSession`.

    `transaction_setup` is the statement run at the start of every transaction for tenants placed
    by schema or by row (see `app.db.tenancy`); it is None for everything else, so the event
    listener that reads it costs one attribute lookup on the common path.
    """

    transaction_setup: tuple[TextClause, dict[str, Any]] | None = None


@event.listens_for(RoutedSession, "after_begin")
def _run_transaction_setup(
    session: RoutedSession, transaction: SessionTransaction, connection: Connection
) -> None:
    # Runs inside the transaction that just began, before any statement of the caller's, so
    # ORM statements and raw text() alike see only the tenant's schema or rows.
    setup = session.transaction_setup
    if setup is not None:
        connection.execute(setup[0], setup[1])


class Node:
    """One PostgreSQL endpoint: an engine, its pool, and the session factories over it."""

    def __init__(
        self,
        name: str,
        role: Role,
        url: URL,
        pool: PoolSettings,
        *,
        connect_timeout: float,
    ) -> None:
        self.name = name
        self.role = role
        self.url = url
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
        # Same pool; BEGIN becomes BEGIN READ ONLY. SQLAlchemy resets the flag on return.
        readonly_engine = self.engine.execution_options(postgresql_readonly=True)
        self.session_factory = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=RoutedSession
        )
        self.readonly_session_factory = async_sessionmaker(
            readonly_engine, expire_on_commit=False, sync_session_class=RoutedSession
        )

    def factory(self, read_only: bool) -> async_sessionmaker[AsyncSession]:
        return self.readonly_session_factory if read_only else self.session_factory

    def pool_status(self) -> dict[str, int]:
        pool = self.engine.pool
        checked_out = getattr(pool, "checkedout", None)
        size = getattr(pool, "size", None)
        return {
            "in_use": checked_out() if callable(checked_out) else 0,
            "size": size() if callable(size) else 0,
        }

    async def dispose(self) -> None:
        await self.engine.dispose()

    def __repr__(self) -> str:
        # URL renders with the password masked; never print the raw string.
        return f"<Node {self.name} {self.role} {self.url!r}>"


class Cluster:
    """A primary and its replicas. Chooses the node for a unit of work."""

    def __init__(self, name: str, primary: Node, replicas: Sequence[Node]) -> None:
        self.name = name
        self.primary = primary
        self.replicas = tuple(replicas)
        self._next_replica = itertools.count()

    @classmethod
    def from_settings(
        cls, name: str, settings: ClusterSettings, *, connect_timeout: float, database: str | None
    ) -> Cluster:
        """Build the cluster; `database` swaps the database name on every node (tenants)."""

        def node(node_name: str, role: Role, url: URL) -> Node:
            if database is not None:
                url = url.set(database=database)
            return Node(node_name, role, url, settings.pool, connect_timeout=connect_timeout)

        primary = node(f"{name}.primary", "primary", settings.primary)
        replicas = [
            node(f"{name}.replica{i}", "replica", url)
            for i, url in enumerate(settings.replicas, start=1)
        ]
        return cls(name, primary, replicas)

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.primary, *self.replicas)

    def reader(self) -> Node | None:
        """The replica for the next read, round-robin; None when the cluster has none.

        The health issue replaces this with a policy over replicas that are up and fresh.
        """
        if not self.replicas:
            return None
        return self.replicas[next(self._next_replica) % len(self.replicas)]

    async def dispose(self) -> None:
        for node in self.nodes:
            await node.dispose()

    def __repr__(self) -> str:
        return f"<Cluster {self.name} primary={self.primary.name} replicas={len(self.replicas)}>"
