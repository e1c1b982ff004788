"""`TenantRegistry`: tenant id -> `Placement`, for the configured tenants and the catalog's.

A serving process holds only the catalogued tenants it uses: an LRU of placements
(`tenancy.catalog_cache_size`), filled by looking ids up in the catalog when they first
arrive, so its memory and its catalog reads stay flat however many tenants the catalog holds.
Each lookup on the hot path is a dictionary read. Misses are looked up in batches: while one
catalog query runs, the ids that arrive wait for it or join the next one, so a burst of
(even random) ids costs one query at a time, never one per id at once. An id the catalog
does not have is remembered as absent for `tenancy.catalog_min_reload` seconds.

Freshness: a pushed change (`catalog_listener`) drops that tenant's placement, so its next
request reads it again; a reconnection of the listener marks every placement stale; a
placement older than `tenancy.catalog_ttl` is read again in the background while the one held
keeps serving. Tools that need every tenant (migrations, backfills) call `reload()`, which
reads the whole catalog once and holds all of it.

Changes this process makes (`remember`, `forget`) and pushed invalidations while a read is in
flight win over what that read returns, so a tenant just added never 404s, one just removed
never comes back, and a change announced during a lookup is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator

from pg_session_router.core.errors import (
    DatabaseUnavailableError,
    TenantInactiveError,
    UnknownTenantError,
)
from pg_session_router.core.names import validate_tenant_id
from pg_session_router.core.settings import DatabaseSettings, TenantSettings
from pg_session_router.db.catalog import TenantCatalog
from pg_session_router.db.driver_errors import UNDEFINED_TABLE_SQLSTATE, describe_error, sqlstate
from pg_session_router.db.tenancy import Placement, place

logger = logging.getLogger(__name__)

#: A change of one tenant: its new placement (`remember`), FORGOTTEN or INVALIDATED.
_Change = Placement | str
FORGOTTEN, INVALIDATED = "forgotten", "invalidated"
_EVERY_TENANT = ""  # the tenant id of a change to all of them (not a valid id)
_MAX_BATCH = 500


class TenantRegistry:
    def __init__(self, database: DatabaseSettings, catalog: TenantCatalog | None = None) -> None:
        self.default_cluster = database.default_cluster
        self.settings = database.tenancy
        self.catalog = catalog
        self._configured = {
            tenant_id: place(tenant_id, tenant, self.default_cluster)
            for tenant_id, tenant in database.tenants.items()
        }
        #: Catalogued placements and when each was read, least recently used first.
        self._cached: OrderedDict[str, tuple[Placement, float]] = OrderedDict()
        #: Ids the catalog did not have, and when it said so.
        self._absent: OrderedDict[str, float] = OrderedDict()
        #: True once `reload()` read everything: then nothing is evicted (a tool's registry).
        self._complete = False
        #: Local changes and invalidations: (sequence number, tenant id, change).
        self._changes: list[tuple[int, str, _Change]] = []
        self._sequence = 0
        self._reads_in_flight = 0
        self._queued: dict[str, asyncio.Future[None]] = {}
        self._lookups: asyncio.Task[None] | None = None
        self._load_failed = False
        self._warned_missing = False
        self._reload: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        #: A catalog read taking longer has failed (a hung primary must not hold every cold
        #: tenant, nor the router's disposal, forever).
        self._read_timeout = max(5.0, database.retry.deadline)

    # -- lookups ---------------------------------------------------------------------------

    def cached(self, tenant_id: str) -> Placement | None:
        """The hot path: a dictionary read. Raises for a known but disabled tenant."""
        placement = self._configured.get(tenant_id)
        if placement is None:
            entry = self._cached.get(tenant_id)
            if entry is None:
                return None
            self._cached.move_to_end(tenant_id)
            placement, read_at = entry
            if self.catalog is not None and time.monotonic() - read_at > self.settings.catalog_ttl:
                # Read it again in the background and keep serving it meanwhile (without a
                # running loop, the next resolve() reads it).
                with contextlib.suppress(RuntimeError):
                    self._queue(tenant_id)
        if not placement.active:
            raise TenantInactiveError(f"tenant {tenant_id!r} is disabled")
        return placement

    def placement(self, tenant_id: str) -> Placement:
        """Synchronous lookup of what is already known (no catalog query)."""
        placement = self.cached(tenant_id)
        if placement is None:
            validate_tenant_id(tenant_id)
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
        return placement

    async def resolve(self, tenant_id: str) -> Placement:
        """Known tenants at once; an unknown id is looked up in the catalog (batched)."""
        placement = self.cached(tenant_id)
        if placement is not None:
            return placement
        validate_tenant_id(tenant_id)
        if self.catalog is not None and not self._known_absent(tenant_id):
            await asyncio.shield(self._queue(tenant_id))
            placement = self.cached(tenant_id)
            if placement is not None:
                return placement
        if self._load_failed:
            raise DatabaseUnavailableError(
                f"tenant {tenant_id!r} is not known here and the tenant catalog is unreachable"
            )
        raise UnknownTenantError(f"unknown tenant {tenant_id!r}")

    async def lookup(self, tenant_id: str) -> Placement | None:
        """Read one tenant from the catalog now (disabled ones too): management commands
        act on what the catalog says, not on what this process held."""
        if tenant_id in self._configured:
            return self._configured[tenant_id]
        if self.catalog is None:
            return None
        self.invalidate(tenant_id)
        await asyncio.shield(self._queue(tenant_id))
        if self._load_failed:
            raise DatabaseUnavailableError("the tenant catalog is unreachable")
        entry = self._cached.get(tenant_id)
        return None if entry is None else entry[0]

    def _known_absent(self, tenant_id: str) -> bool:
        said_at = self._absent.get(tenant_id)
        return said_at is not None and time.monotonic() - said_at < self.settings.catalog_min_reload

    def settings_of(self, tenant_id: str) -> TenantSettings:
        placement = self._configured.get(tenant_id)
        if placement is None:
            entry = self._cached.get(tenant_id)
            if entry is None:  # removed (or evicted) while its cluster was being built
                raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
            placement = entry[0]
        return placement.settings

    def __iter__(self) -> Iterator[Placement]:
        """The configured tenants and the catalogued ones held here (all after `reload()`)."""
        yield from self._configured.values()
        yield from (p for t, (p, _) in self._cached.items() if t not in self._configured)

    def __len__(self) -> int:
        return len(self._configured.keys() | self._cached.keys())

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._configured or tenant_id in self._cached

    # -- reading the catalog ---------------------------------------------------------------

    def _queue(self, tenant_id: str) -> asyncio.Future[None]:
        """The lookup `tenant_id` will be part of (needs a running loop)."""
        waiting = self._queued.get(tenant_id)
        if waiting is not None and waiting.get_loop().is_closed():
            waiting = None  # left by a router used on an event loop that is gone
        if waiting is None:
            waiting = self._queued[tenant_id] = asyncio.get_running_loop().create_future()
            if self._lookups is None or self._lookups.done():
                self._lookups = asyncio.get_running_loop().create_task(
                    self._look_up_queued(), name="tenant-catalog-lookup"
                )
        return waiting

    async def _look_up_queued(self) -> None:
        """One catalog query at a time, each for the ids queued while the last one ran.
        Every waiter is answered, whatever happens (a cancelled or failed task included)."""
        try:
            while self._queued and self.catalog is not None:
                await self._look_up_batch(self.catalog)
        finally:
            for waiting in self._queued.values():
                if not waiting.done() and not waiting.get_loop().is_closed():
                    waiting.set_exception(DatabaseUnavailableError("tenant lookup interrupted"))
            self._queued.clear()

    async def _look_up_batch(self, catalog: TenantCatalog) -> None:
        # No bigger than what the cache holds: a batch evicting its own first ids would
        # look them up again.
        size = min(_MAX_BATCH, self.settings.catalog_cache_size)
        batch = dict(list(self._queued.items())[:size])
        started_at = self._begin_read()
        found: dict[str, TenantSettings] | None
        try:
            async with asyncio.timeout(self._read_timeout):
                found, moving = await catalog.lookup(list(batch))
        except Exception as exc:  # TimeoutError included: a hung read is a failed one
            found, moving = self._lookup_failed(exc)
        finally:
            self._reads_in_flight -= 1
        if found is not None:
            self._apply_lookup(batch, found, moving, started_at)
        self._prune_changes()
        for tenant_id, waiting in batch.items():
            again = found is not None and self._requeued(tenant_id)
            if self._queued.get(tenant_id) is waiting and not again:
                del self._queued[tenant_id]
                waiting.set_result(None)
        self._announce_change()

    def _lookup_failed(
        self, exc: Exception
    ) -> tuple[dict[str, TenantSettings] | None, dict[str, str]]:
        if sqlstate(exc) == UNDEFINED_TABLE_SQLSTATE:  # no catalog yet: nobody is in it
            self._warn_missing()
            return {}, {}
        if not self._load_failed:
            logger.warning("tenant catalog unavailable: %s", describe_error(exc))
        self._load_failed = True
        return None, {}

    def _apply_lookup(
        self,
        batch: dict[str, asyncio.Future[None]],
        found: dict[str, TenantSettings],
        moving: dict[str, str],
        started_at: int,
    ) -> None:
        self._load_failed = False
        changed = self._changed_since(started_at)
        now = time.monotonic()
        for tenant_id in batch:
            if tenant_id in changed or _EVERY_TENANT in changed:
                continue  # changed while we read: a local change stands, an invalidation re-reads
            tenant = found.get(tenant_id)
            if tenant is None:
                self._cached.pop(tenant_id, None)
                self._mark_absent(tenant_id, now)
            else:
                placement = place(tenant_id, tenant, self.default_cluster, moving.get(tenant_id))
                self._store(tenant_id, placement, now)
        self._prune_changes()

    def _requeued(self, tenant_id: str) -> bool:
        """An invalidation arrived while its lookup ran: look it up again, same waiters."""
        return tenant_id not in self._cached and tenant_id not in self._absent

    async def reload(self) -> None:
        """Read the whole catalog and hold all of it (tools); concurrent callers share one
        read (single flight)."""
        # Shielded: one caller's cancellation must not cancel the reload the others wait on.
        await asyncio.shield(self._start_reload())

    async def settle(self) -> None:
        """Wait for the catalog reads in flight to finish (before the pools close: a read
        cancelled mid-query would drop its pooled connection unreturned)."""
        for running in (self._reload, self._lookups):
            if running is not None and not running.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(running)

    async def refresh(self) -> None:
        """A whole reload that starts after this call (a change was announced), never one
        already running, which may have read the catalog before the change committed."""
        running = self._reload
        if running is not None and not running.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        if self._reload is running:
            self._reload = None
        await self.reload()

    def _start_reload(self) -> asyncio.Task[None]:
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(
                self._load(), name="tenant-catalog-reload"
            )
        return self._reload

    async def _load(self) -> None:
        assert self.catalog is not None
        started_at = self._begin_read()
        try:
            async with asyncio.timeout(self._read_timeout * 4):  # the whole table: longer
                tenants, moving = await self.catalog.load()
        except Exception as exc:  # the primary may be down, or the table not created yet
            if sqlstate(exc) != UNDEFINED_TABLE_SQLSTATE:
                if not self._load_failed:
                    logger.warning("tenant catalog unavailable: %s", describe_error(exc))
                self._load_failed = True
                self._prune_changes()
                return
            self._warn_missing()
            tenants, moving = {}, {}
        finally:
            self._reads_in_flight -= 1
        self._load_failed = False
        now = time.monotonic()
        loaded = OrderedDict(
            (
                tenant_id,
                (place(tenant_id, tenant, self.default_cluster, moving.get(tenant_id)), now),
            )
            for tenant_id, tenant in tenants.items()
        )
        # Changes made since this load began may be missing from what it read: replay them.
        for _, tenant_id, change in self._changes_since(started_at):
            if isinstance(change, Placement):
                loaded[tenant_id] = (change, now)
            elif tenant_id != _EVERY_TENANT:
                # Forgotten, or announced meanwhile (perhaps disabled): read again on next use.
                loaded.pop(tenant_id, None)
            else:
                loaded = OrderedDict((t, (p, float("-inf"))) for t, (p, _) in loaded.items())
        self._cached, self._complete = loaded, True
        self._absent.clear()
        self._prune_changes()
        self._announce_change()

    def _warn_missing(self) -> None:
        if not self._warned_missing:
            logger.warning("no tenant catalog table yet: run the migrations")
            self._warned_missing = True

    @property
    def catalog_unreachable(self) -> bool:
        """The last catalog read failed (the table missing is not a failure: no tenants)."""
        return self._load_failed

    # -- what is held ----------------------------------------------------------------------

    def _store(self, tenant_id: str, placement: Placement, read_at: float) -> None:
        self._cached[tenant_id] = (placement, read_at)
        self._cached.move_to_end(tenant_id)
        self._absent.pop(tenant_id, None)
        if not self._complete:
            while len(self._cached) > self.settings.catalog_cache_size:
                self._cached.popitem(last=False)

    def hold_what_is_used(self) -> None:
        """After a whole `reload()` (a tool's, or `migrate` at an app's startup): bound the
        placements held again, the least recently used going first."""
        self._complete = False
        while len(self._cached) > self.settings.catalog_cache_size:
            self._cached.popitem(last=False)

    def _mark_absent(self, tenant_id: str, said_at: float) -> None:
        self._absent[tenant_id] = said_at
        self._absent.move_to_end(tenant_id)
        while len(self._absent) > self.settings.catalog_cache_size:
            self._absent.popitem(last=False)

    # -- changes ---------------------------------------------------------------------------

    def remember(
        self, tenant_id: str, tenant: TenantSettings, moving: str | None = None
    ) -> Placement:
        """Make a tenant routable in this process at once (after writing it to the catalog)."""
        placement = place(tenant_id, tenant, self.default_cluster, moving)
        self._store(tenant_id, placement, time.monotonic())
        self._record(tenant_id, placement)
        return placement

    def forget(self, tenant_id: str) -> None:
        self._cached.pop(tenant_id, None)
        self._mark_absent(tenant_id, time.monotonic())
        self._record(tenant_id, FORGOTTEN)

    def invalidate(self, tenant_id: str) -> None:
        """Another process changed this tenant: read it again on its next request."""
        self._cached.pop(tenant_id, None)
        self._absent.pop(tenant_id, None)
        self._record(tenant_id, INVALIDATED)

    def invalidate_all(self) -> None:
        """Changes may have been missed (the listener was disconnected): every placement is
        read again on its next use, served meanwhile; every absent id may exist now."""
        self._cached = OrderedDict((t, (p, float("-inf"))) for t, (p, _) in self._cached.items())
        self._absent.clear()
        self._record(_EVERY_TENANT, INVALIDATED)

    def _record(self, tenant_id: str, change: _Change) -> None:
        # Only reads in flight need the changes made meanwhile; none in flight, none kept.
        if self._reads_in_flight:
            self._sequence += 1
            self._changes.append((self._sequence, tenant_id, change))
        self._announce_change()

    def _begin_read(self) -> int:
        self._reads_in_flight += 1
        return self._sequence

    def _changes_since(self, sequence: int) -> list[tuple[int, str, _Change]]:
        return [change for change in self._changes if change[0] > sequence]

    def _changed_since(self, sequence: int) -> set[str]:
        return {tenant_id for _, tenant_id, _ in self._changes_since(sequence)}

    def _prune_changes(self) -> None:
        if not self._reads_in_flight:
            self._changes.clear()

    def _announce_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, within: float, tenant_id: str) -> None:
        """Until the next change of what this registry holds, or `within` seconds; then
        `tenant_id` is read again (a pushed change may have been missed while reconnecting)."""
        try:
            await asyncio.wait_for(self._changed.wait(), within)
        except TimeoutError:
            self.invalidate(tenant_id)

    async def close(self) -> None:
        # Cancelling the lookup task answers its waiters (DatabaseUnavailableError), rather
        # than cancelling requests that did not ask for it.
        for task in (self._reload, self._lookups):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reload = self._lookups = None
