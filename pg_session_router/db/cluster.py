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

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import greenlet_spawn

from pg_session_router.core.settings import (
    ClusterSettings,
    DatabaseSettings,
    PoolSettings,
    SessionSettings,
)
from pg_session_router.db.balancing import POLICIES, ReplicaPolicy
from pg_session_router.db.credentials import PasswordProvider
from pg_session_router.db.health import HealthMonitor, ServerHealth
from pg_session_router.db.keys import ClusterKey
from pg_session_router.db.pool import RouterPool
from pg_session_router.db.routed_session import RoutedSession, hand_out_raw
from pg_session_router.db.sockets import dead_peer_detection

logger = logging.getLogger(__name__)

#: The reasons a reader choice can give (a subset of `routing.RouteReason`, which imports us).
ReaderReason = Literal[
    "replica",
    "consistency-token",
    "fallback-no-replica",
    "fallback-lag",
    "fallback-circuit-open",
]

Role = Literal["primary", "replica"]


def _clean_for_use_outside_the_router(connection: Any) -> None:
    """`engine_connect` hook: `engine.connect()` outside the router (a host's raw use of the
    seed's `engine`, the catalog, checks, migrations) never gets a connection still set up for
    a tenant, nor what a tenant's session left on it."""
    try:
        hand_out_raw(connection)
    except Exception as exc:
        # The connection is dead (or the reset failed): raising here, inside Connection's
        # constructor, would leave the pooled connection checked out for ever. Invalidated,
        # it is replaced on first use, and a new one has nobody's state.
        connection.invalidate(exc)


def _unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


#: Behind a transaction-mode pooler, consecutive statements of one client may run on different
#: server connections, and one server connection serves many clients: no statement cache
#: (asyncpg's or SQLAlchemy's), and every prepared statement named uniquely, so that no client
#: finds another's statement, or misses its own (sqlalchemy#6467, asyncpg#1058).
POOLER_CONNECT_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": _unique_statement_name,
}


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
        session: SessionSettings,
        dead_connection_timeout: float | None = None,
        weight: int = 1,
        behind_pooler: bool = False,
        direct_url: URL | None = None,
        password: PasswordProvider | None = None,
    ) -> None:
        self.name = name
        #: Sessions routed here and not ended yet (a drain of its server waits for them).
        self.in_flight = 0
        self.behind_pooler = behind_pooler
        #: Where this node's password comes from when not from its URL (read at connect).
        self.password = password
        #: The server itself, on this node's database (not through a pooler): for what a
        #: transaction pooler cannot carry (LISTEN, session advisory locks).
        self.direct_url = direct_url or url
        self.configured_role = configured_role
        self.url = url
        self.health = health
        self.weight = weight
        #: Pools disposed, or being disposed, while sessions may hold their connections
        #: (counted in `in_use` until none is held).
        self._retired_pools: list[RouterPool] = []
        pool_engine = create_async_engine(
            url,
            pool_size=pool.size,
            max_overflow=pool.max_overflow,
            pool_timeout=pool.timeout,
            pool_recycle=pool.recycle,
            pool_pre_ping=pool.pre_ping,
            poolclass=RouterPool.configured(
                ping_idle_after=pool.ping_idle_after,
                ping_within=connect_timeout,
                health=health,
            ),
            echo=session.echo,
            # Bound values (tenant data) never appear in error messages or logs.
            hide_parameters=True,
            connect_args={
                # asyncpg's `timeout` bounds TCP connect plus the startup handshake.
                "timeout": connect_timeout,
                "server_settings": {"application_name": f"session-router:{name}"},
                **(POOLER_CONNECT_ARGS if behind_pooler else {}),
                # asyncpg calls it for every new connection: a rotated secret is used at once.
                **({"password": password} if password is not None else {}),
            },
        )
        if dead_connection_timeout is not None:
            # A pool listener, not an engine one (see below): it runs once per new connection.
            event.listen(
                pool_engine.sync_engine.pool,
                "connect",
                dead_peer_detection(dead_connection_timeout),
                insert=True,  # before the dialect's own first round trips on the connection
            )
        # Three engines over the one pool (option engines share their parent's pool). The
        # parent itself carries no connection events, on purpose: a connection of an engine
        # with any engine-level listener dispatches every event of its life (connect, begin,
        # execute, cursor execute, rollback) through a per-connection joined dispatcher, about
        # a tenth of a hand-written session's CPU. So the hook that cleans connections for use
        # outside the router sits on `engine` alone (the raw face), and the routed engines,
        # which set connections up themselves (`routed_session`), carry none.
        #: For use outside the router (`engine.connect()`): catalog, checks, migrations, hosts.
        self.engine: AsyncEngine = pool_engine.execution_options()
        if not behind_pooler:  # behind one, nothing is left on a connection to clean
            event.listen(
                self.engine.sync_engine, "engine_connect", _clean_for_use_outside_the_router
            )
        # Routed sessions use the parent itself (an option engine reads its event flag through
        # a property, six times per session). The read-only one turns BEGIN into BEGIN READ
        # ONLY (SQLAlchemy resets the flag on return; that characteristic is itself an
        # engine_connect listener, on that engine alone).
        routed_engine = pool_engine
        readonly_engine = pool_engine.execution_options(postgresql_readonly=True)
        self._routed_sync_engine = routed_engine.sync_engine
        self._readonly_sync_engine = readonly_engine.sync_engine
        options: dict[str, Any] = {
            "expire_on_commit": session.expire_on_commit,
            "autoflush": session.autoflush,
            "sync_session_class": RoutedSession,
        }
        self.session_factory = async_sessionmaker(routed_engine, **options)
        self.readonly_session_factory = async_sessionmaker(readonly_engine, **options)
        # What `factory()` hands the router: the same sessions, built without the
        # sessionmaker's per-call merge of its options (a Python loop; partial's is in C).
        self._new_session = partial(AsyncSession, routed_engine, **options)
        self._new_readonly_session = partial(AsyncSession, readonly_engine, **options)

    @property
    def role(self) -> Role | None:
        """The role the server has now (from the last probe), else the configured one."""
        in_recovery = self.health.in_recovery
        if in_recovery is None:
            return self.configured_role
        return "replica" if in_recovery else "primary"

    @property
    def writable(self) -> bool:
        health = self.health
        return health.up and not health.drained and self.role == "primary"

    @property
    def readable_replica(self) -> bool:
        health = self.health
        return health.up and health.fresh and not health.drained and self.role == "replica"

    def factory(self, read_only: bool) -> Callable[[], AsyncSession]:
        """Writes: read-write. Reads on a replica: plain too, since a hot standby refuses
        writes by itself (and BEGIN READ ONLY would cost a little on every read). Reads on a
        primary: READ ONLY transactions."""
        if read_only and self.role != "replica":
            return self._new_readonly_session
        return self._new_session

    def sync_engine(self, read_only: bool) -> Any:
        """The sync engine `factory(read_only)` binds its sessions to (to rebind one)."""
        if read_only and self.role != "replica":
            return self._readonly_sync_engine
        return self._routed_sync_engine

    def in_use(self) -> int:
        """Connections sessions hold: of the pool, and of pools disposed before they ended."""
        checked_out = getattr(self.engine.pool, "checkedout", None)
        held = int(checked_out()) if callable(checked_out) else 0
        if self._retired_pools:
            self._retired_pools = [
                p for p in self._retired_pools if not p.retired or p.held_after_retirement > 0
            ]
            held += sum(p.held_after_retirement for p in self._retired_pools)
        return held

    def pool_status(self) -> dict[str, Any]:
        pool = self.engine.pool
        size = getattr(pool, "size", None)
        return {
            "in_use": self.in_use(),
            "size": int(size()) if callable(size) else 0,
            "checkouts": getattr(pool, "checkouts", 0),
            "checkout_wait_seconds": getattr(pool, "checkout_wait", 0.0),
        }

    async def dispose(self) -> None:
        """Close the pool's idle connections; the engine goes on with a new, empty pool (see
        `RouterPool.retired` for the connections still checked out)."""
        # The engine gets its new pool first and the old one is closed after, shielded: a
        # dispose cancelled midway (a drain whose caller gave up) must not leave the engine
        # holding a retired pool, which would refuse every checkout from then on.
        retired = self.engine.pool
        await self.engine.dispose(close=False)
        try:
            await asyncio.shield(greenlet_spawn(retired.dispose))
        finally:  # also when cancelled: the shielded dispose goes on, and its count matters
            if isinstance(retired, RouterPool):
                self._retired_pools.append(retired)

    def __repr__(self) -> str:
        # URL renders with the password masked; never print the raw string.
        return f"<Node {self.name} {self.role} {self.url!r}>"


class Cluster:
    """A primary and its replicas. Chooses the node for a unit of work."""

    def __init__(
        self,
        key: ClusterKey,
        nodes: Sequence[Node],
        policy: ReplicaPolicy,
        *,
        fallback_to_primary: bool,
    ) -> None:
        self.key = key
        self.name = key.name
        self.nodes = tuple(nodes)
        self.policy = policy
        self.fallback_to_primary = fallback_to_primary
        # The readable replicas as of `_readers_at` of the servers' shared epoch (see
        # `readable_replicas`); None: the nodes' servers do not share one, never cached.
        epochs = {node.health.epoch for node in self.nodes}  # by identity
        self._epoch = epochs.pop() if len(epochs) == 1 else None
        self._readers: tuple[Node, ...] = ()
        self._readers_at = -1
        self._writer: Node | None = None
        self._writer_at = -1
        #: The nodes of the last split brain warned about (logged once per change).
        self._split_warned: tuple[str, ...] = ()
        #: Sessions open on this cluster's nodes (an idle tenant cluster may be evicted).
        self.in_flight = 0
        #: Set when this tenant cluster is about to be evicted: new sessions wait for a new one.
        self.draining = False

    @classmethod
    def from_settings(
        cls,
        key: ClusterKey,
        settings: ClusterSettings,
        *,
        monitor: HealthMonitor,
        database: DatabaseSettings,
        pool: PoolSettings | None = None,
        password: PasswordProvider | None = None,
    ) -> Cluster:
        """Build the cluster; a key naming a database swaps it in on every node (tenants)."""

        def node(role: Role | None, label: str, url: URL, weight: int = 1) -> Node:
            probe = settings.probe_urls.get(label, url)
            if key.database is not None:
                url, probe = url.set(database=key.database), probe.set(database=key.database)
            return Node(
                f"{key.name}.{label}",
                role,
                url,
                pool or settings.pool,
                health=monitor.server(probe, password),  # the server itself, not a pooler
                connect_timeout=database.connect_timeout,
                session=database.session,
                dead_connection_timeout=database.dead_connection_timeout,
                weight=weight,
                behind_pooler=settings.pooler != "none",
                direct_url=probe,
                password=password,
            )

        nodes: list[Node] = []
        if settings.primary is not None:
            nodes.append(node("primary", "primary", settings.primary))
        for i, replica in enumerate(settings.replicas, start=1):
            nodes.append(node("replica", f"replica{i}", replica.url, replica.weight))
        for i, url in enumerate(settings.nodes, start=1):
            nodes.append(node(None, f"node{i}", url))
        routing = database.routing
        policy = POLICIES[routing.policy]()
        return cls(key, nodes, policy, fallback_to_primary=routing.fallback_to_primary)

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
        """The node writes go to: the leader (below) while it is up and not drained, else
        None (writes wait for it, or for a newer one). Answered from the last look until a
        server's health changes, like `readable_replicas`."""
        epoch = self._epoch
        if epoch is None or epoch.value != self._writer_at:
            leader = self.leader()
            self._writer = leader if leader is not None and leader.writable else None
            self._writer_at = -1 if epoch is None else epoch.value
        return self._writer

    def leader(self) -> Node | None:
        """The primary the cluster follows: of the nodes last seen out of recovery (up or
        not), the one on the newest timeline. Two such (a split brain: the old primary started
        again as one after a failover): the newer one's history includes the promotion, and
        the old one never leads again, even while the newer one is down; the first listed on
        a tie."""
        primaries = [node for node in self.nodes if node.role == "primary"]
        # max() keeps the first of equals; an unknown timeline (not probed yet) is the oldest.
        leader = max(primaries, key=lambda node: node.health.timeline or 0, default=None)
        names = tuple(node.name for node in primaries)
        if len(primaries) > 1 and names != self._split_warned:
            assert leader is not None
            logger.warning(
                "%s: %s are out of recovery; %s on timeline %s leads",
                self.name,
                ", ".join(names),
                leader.name,
                leader.health.timeline,
            )
        self._split_warned = names if len(primaries) > 1 else ()
        return leader

    def choose_reader(self, min_lsn: int | None = None) -> tuple[Node | None, ReaderReason]:
        """A fresh, healthy replica by the policy; else the writer if falling back is allowed;
        and the reason for the choice (a `routing.RouteReason`).

        With `min_lsn` (read-your-writes), only replicas known to have replayed that far; the
        primary always has, so it serves the read when none has (whatever the fallback rule).
        """
        candidates: Sequence[Node] = self.readable_replicas()
        if min_lsn is not None:
            candidates = [
                n for n in candidates if n.health.lsn is not None and n.health.lsn >= min_lsn
            ]
            if not candidates:
                return self.writer(), "consistency-token"
        if candidates:
            # One replica is the common case: every policy would choose it.
            node = candidates[0] if len(candidates) == 1 else self.policy.choose(candidates)
            return node, "replica"
        return (self.writer() if self.fallback_to_primary else None), self._why_no_replica()

    def readable_replicas(self) -> tuple[Node, ...]:
        """Replicas a read may go to now: up, fresh, not drained. Asked on every read, and
        answered from the last look until a server's health changes (`RoutingEpoch`)."""
        epoch = self._epoch
        if epoch is None or epoch.value != self._readers_at:
            self._readers = tuple(node for node in self.nodes if node.readable_replica)
            self._readers_at = -1 if epoch is None else epoch.value
        return self._readers

    def _why_no_replica(self) -> ReaderReason:
        replicas = [node for node in self.nodes if node.role == "replica"]
        if not replicas:
            return "fallback-no-replica"
        if any(node.health.up for node in replicas):
            return "fallback-lag"
        return "fallback-circuit-open"

    async def dispose(self) -> None:
        for node in self.nodes:
            await node.dispose()

    def __repr__(self) -> str:
        return f"<Cluster {self.name} nodes={[node.name for node in self.nodes]}>"
