"""`TenantRegistry`: tenant id -> `Placement`, for the configured tenants and the catalog's.

Each lookup on the hot path is a dictionary read. The catalog is reloaded whole: in the
background every `tenancy.catalog_ttl`, and when an unknown id arrives at most once per
`tenancy.catalog_min_reload` (a burst of random ids costs at most one query per interval; an
id that arrives while a reload is running waits for that reload instead of getting 404).
Changes this process makes (`remember`, `forget`) while a reload is in flight are applied on
top of what the reload read, so a tenant just added never 404s and one just removed never
comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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


class TenantRegistry:
    def __init__(self, database: DatabaseSettings, catalog: TenantCatalog | None = None) -> None:
        self.default_cluster = database.default_cluster
        self.settings = database.tenancy
        self.catalog = catalog
        self._configured = {
            tenant_id: place(tenant_id, tenant, self.default_cluster)
            for tenant_id, tenant in database.tenants.items()
        }
        self._catalogued: dict[str, Placement] = {}
        #: Local changes: (sequence number, tenant id, placement or None when forgotten).
        self._changes: list[tuple[int, str, Placement | None]] = []
        self._sequence = 0
        self._loaded_at = float("-inf")
        self._load_failed = False
        self._warned_missing = False
        self._reload: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- lookups ---------------------------------------------------------------------------

    def cached(self, tenant_id: str) -> Placement | None:
        """The hot path: a dictionary read. Raises for a known but disabled tenant."""
        placement = self._configured.get(tenant_id) or self._catalogued.get(tenant_id)
        if placement is None:
            return None
        if not placement.active:
            raise TenantInactiveError(f"tenant {tenant_id!r} is disabled")
        if (
            self.catalog is not None
            and time.monotonic() - self._loaded_at > self.settings.catalog_ttl
        ):
            # Refresh in the background and keep serving what we know (without a running loop,
            # the next resolve() reloads).
            with contextlib.suppress(RuntimeError):
                self._start_reload()
        return placement

    def placement(self, tenant_id: str) -> Placement:
        """Synchronous lookup of what is already known (no catalog query)."""
        placement = self.cached(tenant_id)
        if placement is None:
            validate_tenant_id(tenant_id)
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
        return placement

    async def resolve(self, tenant_id: str) -> Placement:
        """Known tenants at once; an unknown id may trigger one (shared) catalog reload."""
        placement = self.cached(tenant_id)
        if placement is not None:
            return placement
        validate_tenant_id(tenant_id)
        if self.catalog is not None and self._should_reload_for_miss():
            await self.reload()
            placement = self.cached(tenant_id)
            if placement is not None:
                return placement
        if self._load_failed:
            raise DatabaseUnavailableError(
                f"tenant {tenant_id!r} is not known here and the tenant catalog is unreachable"
            )
        raise UnknownTenantError(f"unknown tenant {tenant_id!r}")

    def _should_reload_for_miss(self) -> bool:
        in_flight = self._reload is not None and not self._reload.done()
        due = time.monotonic() - self._loaded_at >= self.settings.catalog_min_reload
        return in_flight or due

    def settings_of(self, tenant_id: str) -> TenantSettings:
        placement = self._configured.get(tenant_id) or self._catalogued.get(tenant_id)
        if placement is None:  # removed (e.g. by a reload) while its cluster was being built
            raise UnknownTenantError(f"unknown tenant {tenant_id!r}")
        return placement.settings

    def __iter__(self) -> Iterator[Placement]:
        yield from self._configured.values()
        yield from (p for t, p in self._catalogued.items() if t not in self._configured)

    def __len__(self) -> int:
        return len(self._configured.keys() | self._catalogued.keys())

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._configured or tenant_id in self._catalogued

    # -- catalog ---------------------------------------------------------------------------

    async def reload(self) -> None:
        """Re-read the catalog; concurrent callers share one query (single flight)."""
        # Shielded: one caller's cancellation must not cancel the reload the others wait on.
        await asyncio.shield(self._start_reload())

    async def settle(self) -> None:
        """Wait for a reload in flight to finish (before the pools close: a reload cancelled
        mid-query would drop its pooled connection unreturned)."""
        running = self._reload
        if running is not None and not running.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(running)

    async def refresh(self) -> None:
        """A reload that starts after this call (a change was announced), never one already
        running, which may have read the catalog before the change committed. Concurrent
        callers share the new reload."""
        running = self._reload
        await self.settle()
        if self._reload is running:
            self._reload = None
        await self.reload()

    def _start_reload(self) -> asyncio.Task[None]:
        """The reload in flight, or a new one (needs a running loop)."""
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(
                self._load(), name="tenant-catalog-reload"
            )
        return self._reload

    async def _load(self) -> None:
        assert self.catalog is not None
        self._loaded_at = time.monotonic()  # also rate-limits retries after a failure
        started_at = self._sequence
        try:
            tenants, moving = await self.catalog.load()
        except Exception as exc:  # the primary may be down, or the table not created yet
            if sqlstate(exc) != UNDEFINED_TABLE_SQLSTATE:
                if not self._load_failed:
                    logger.warning("tenant catalog unavailable: %s", describe_error(exc))
                self._load_failed = True
                return
            if not self._warned_missing:
                logger.warning("no tenant catalog table yet: run the migrations")
                self._warned_missing = True
            tenants, moving = {}, {}
        self._load_failed = False
        catalogued = {
            tenant_id: place(tenant_id, tenant, self.default_cluster, moving.get(tenant_id))
            for tenant_id, tenant in tenants.items()
        }
        # Changes made since this load began may be missing from what it read: replay them.
        # Older ones are in the table already (they are recorded after their write commits).
        self._changes = [change for change in self._changes if change[0] >= started_at]
        for _, tenant_id, placement in self._changes:
            if placement is None:
                catalogued.pop(tenant_id, None)
            else:
                catalogued[tenant_id] = placement
        self._catalogued = catalogued
        self._announce_change()

    def _announce_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, within: float) -> None:
        """Until the next change of what this registry knows, or `timeout` seconds; then a
        reload of its own (a pushed change may have been missed while reconnecting)."""
        try:
            await asyncio.wait_for(self._changed.wait(), within)
        except TimeoutError:
            await self.refresh()

    @property
    def catalog_unreachable(self) -> bool:
        """The last catalog load failed (the table missing is not a failure: no tenants)."""
        return self._load_failed

    def remember(
        self, tenant_id: str, tenant: TenantSettings, moving: str | None = None
    ) -> Placement:
        """Make a tenant routable in this process at once (after writing it to the catalog)."""
        placement = place(tenant_id, tenant, self.default_cluster, moving)
        self._catalogued[tenant_id] = placement
        self._record(tenant_id, placement)
        return placement

    def forget(self, tenant_id: str) -> None:
        self._catalogued.pop(tenant_id, None)
        self._record(tenant_id, None)

    def _record(self, tenant_id: str, placement: Placement | None) -> None:
        self._sequence += 1
        self._changes.append((self._sequence, tenant_id, placement))
        self._announce_change()

    async def close(self) -> None:
        task, self._reload = self._reload, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
