"""Catalog changes pushed to every process: LISTEN/NOTIFY on the default cluster's primary.

Adding, enabling, disabling, removing or moving a tenant notifies channel `pgrouter_catalog`
with the tenant's id in the same transaction as the change (PostgreSQL delivers it at COMMIT,
never for a rolled-back change). Each router started with `start()` listens on a connection
of its own to the default cluster's current writer and drops that tenant's placement from
its registry when told, so its next request reads it again: other processes see the change
within milliseconds instead of `tenancy.catalog_ttl`. After any disconnection (the server
restarted, a failover, the backend terminated) it reconnects to whichever node is the writer
then, with a doubling backoff, and marks every placement it holds stale: a change notified
while nobody listened is not lost. The TTL re-read stays as the safety net.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import TextClause, text

from pg_session_router.core.names import is_tenant_id
from pg_session_router.db.cluster import Node
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.registry import TenantRegistry
from pg_session_router.db.tasks import cancel_and_wait, connect_direct, start_background

logger = logging.getLogger(__name__)

CHANNEL = "pgrouter_catalog"
APPLICATION_NAME = "session-router:catalog"
_FIRST_BACKOFF, _MAX_BACKOFF = 0.1, 5.0


def notify_statement(tenant_id: str) -> TextClause:
    """Run in the transaction that changes the catalog: delivered at its COMMIT."""
    return text("SELECT pg_notify(:channel, :tenant)").bindparams(channel=CHANNEL, tenant=tenant_id)


class CatalogListener:
    def __init__(
        self,
        registry: TenantRegistry,
        writer: Callable[[], Node | None],
        connect_timeout: float,
        dead_after: float | None = None,
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._connect_timeout = connect_timeout
        #: An idle LISTEN connection cut without a FIN would miss every notification unnoticed.
        self._dead_after = dead_after
        self._task: asyncio.Task[None] | None = None
        #: Set while subscribed (tests and status wait on it).
        self.listening = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def subscribed(self) -> bool | None:
        """Listening now; None when not started (what `router.status()` reports)."""
        return self.listening.is_set() if self.running else None

    def start(self) -> None:
        if not self.running:
            self.listening = asyncio.Event()
            self._task = start_background(self._run(), "tenant-catalog-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                await self._listen_until_lost()
                backoff = _FIRST_BACKOFF
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("catalog listener: %s", describe_error(exc))
            self.listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _listen_until_lost(self) -> None:
        writer = self._writer()
        if writer is None:
            raise ConnectionError("the default cluster has no writer now")
        # The server itself: LISTEN cannot go through a transaction pooler.
        connection = await connect_direct(
            writer.direct_url,
            connect_timeout=self._connect_timeout,
            application_name=APPLICATION_NAME,
            password=writer.password,
            dead_after=self._dead_after,
        )
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._notified)
            self.listening.set()
            # Whatever changed while nobody listened (first start, or an outage).
            self._registry.invalidate_all()
            await lost.wait()
            logger.info("catalog listener lost its connection: reconnecting")
        finally:
            connection.terminate()

    def _notified(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if is_tenant_id(payload):
            self._registry.invalidate(payload)
        else:  # not one of ours (anyone may NOTIFY): the safe reading is "anything changed"
            self._registry.invalidate_all()
