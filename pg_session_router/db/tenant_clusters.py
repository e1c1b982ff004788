"""The clusters built for database-placed tenants: created on first use, bounded by an LRU.

Every node of such a cluster is an engine with its own pool, so thousands of tenants would mean
thousands of pools. At most `tenancy.max_engines` engines exist at once; a new tenant's
cluster first evicts the least recently used ones that have no session in flight (an engine is
disposed only when its sessions are done). When every one is busy, the least recently used is
*drained*: its new sessions wait too, so it becomes idle even under steady traffic, and the wait
is bounded by the pool timeout. Together with pools sized by `tenancy.pool`, this bounds the
connections a process can hold (checked against `database.max_connections` at startup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.db.cluster import Cluster
from pg_session_router.db.keys import ClusterKey

logger = logging.getLogger(__name__)


def _loop_time(monotonic_deadline: float) -> float:
    """A `time.monotonic()` deadline on the running loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())


class TenantClusterCache:
    """The LRU of tenant clusters, bounded in engines (one per node)."""

    def __init__(
        self,
        build: Callable[[ClusterKey], Cluster],
        *,
        max_engines: int,
        wait_timeout: float,
        on_evict: Callable[[Cluster], None],
    ) -> None:
        self._build = build
        self.max_engines = max_engines
        self._wait_timeout = wait_timeout
        self._on_evict = on_evict
        #: Tenant clusters closed so far (to make room, removed, or at dispose).
        self.evictions = 0
        self._lru: OrderedDict[ClusterKey, Cluster] = OrderedDict()
        self.engines = 0
        self._idle = asyncio.Event()
        self._lock: asyncio.Lock | None = None

    def __contains__(self, key: object) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, key: ClusterKey) -> None:
        """A cluster was just used: the last to be evicted (nothing for a configured one)."""
        lru = self._lru
        if key in lru:
            lru.move_to_end(key)

    def build_now(self, key: ClusterKey) -> Cluster:
        """Build without waiting for room (migrations, introspection); may exceed the LRU bound
        until the next `acquire` evicts."""
        return self._admit(key, self._build(key))

    def _admit(self, key: ClusterKey, cluster: Cluster) -> Cluster:
        self._lru[key] = cluster
        self.engines += len(cluster.nodes)
        return cluster

    async def acquire(self, key: ClusterKey) -> Cluster:
        """The tenant's cluster, built when missing, after making room within the bound.

        One deadline for the whole wait, queueing for the lock included: a request never waits
        longer than the pool timeout, however many are queued before it."""
        deadline = time.monotonic() + self._wait_timeout
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await self._lock.acquire()
        except TimeoutError:
            raise self._busy() from None
        try:
            return await self._acquire_locked(key, deadline)
        finally:
            self._lock.release()

    async def _acquire_locked(self, key: ClusterKey, deadline: float) -> Cluster:
        cluster = self._lru.get(key)
        if cluster is not None and not cluster.draining:
            self.touch(key)
            return cluster
        if cluster is not None:  # being drained for someone else: let it go, then rebuild
            await self._until_idle(cluster, deadline)
            await self.evict(cluster)
        cluster = self._build(key)
        try:
            await self._make_room(len(cluster.nodes), deadline)
        except BaseException:
            self._on_evict(cluster)
            await cluster.dispose()
            raise
        return self._admit(key, cluster)

    def _busy(self) -> DatabaseUnavailableError:
        return DatabaseUnavailableError(
            f"all {self.engines} tenant database engines are busy "
            "(database.tenancy.max_engines); try again shortly"
        )

    async def _make_room(self, needed: int, deadline: float) -> None:
        while self.engines + needed > self.max_engines:
            if not self._lru:  # more nodes than the whole budget (refused at startup too)
                raise self._busy()
            victim = next((c for c in self._lru.values() if c.in_flight == 0), None)
            if victim is None:
                # Every cluster is busy. Drain the least recently used one: its new sessions
                # wait here too, so it becomes idle even under steady traffic (no starvation).
                victim = next(iter(self._lru.values()))
                await self._until_idle(victim, deadline)
            await self.evict(victim)

    async def _until_idle(self, cluster: Cluster, deadline: float) -> None:
        cluster.draining = True
        while cluster.in_flight > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Given up: the cluster goes on serving its own tenant as before.
                cluster.draining = False
                raise self._busy()
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), remaining)

    def became_idle(self, cluster: Cluster) -> None:
        """Called when the last session on `cluster` ended: wakes anyone waiting for room."""
        if cluster.key in self._lru:
            self._idle.set()

    async def evict(self, cluster: Cluster) -> None:
        if self._lru.pop(cluster.key, None) is None:
            return
        self.engines -= len(cluster.nodes)
        self.evictions += 1
        self._on_evict(cluster)
        logger.debug("evicted tenant cluster %s", cluster.name)
        await cluster.dispose()

    async def close(self) -> None:
        for cluster in list(self._lru.values()):
            await self.evict(cluster)
        # asyncio primitives bind to the loop that first waits on them: a router reused after
        # dispose() (on another loop) gets fresh ones.
        self._idle = asyncio.Event()
        self._lock = None
