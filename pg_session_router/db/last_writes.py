"""Each tenant's last commit position, shared by every app process
(`http.consistency_memory = "shared"`).

One row per tenant (`""`: requests without one) in `router_last_writes`, a table of the
router's beside its `tenants` catalog on the default cluster's primary (created by
`migrate`, hidden from tenant sessions like the catalog). A committed write raises its
tenant's row to the write's position; a read that brings no token looks the row up, on the
primary (a replica could be behind on this very row), and reads at least that fresh. Cost:
one upsert per write and one primary-key lookup per token-less read, both on the primary.
Best effort: a process that dies between a write's COMMIT and its upsert leaves the row
behind, and a lookup that fails reads without a token (both are logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import or_, select
from sqlalchemy.dialects.postgresql import insert

from pg_session_router.core.names import is_tenant_id
from pg_session_router.db.catalog import last_writes_table
from pg_session_router.db.consistency import ConsistencyToken
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target

logger = logging.getLogger(__name__)


class SharedLastWrites:
    """`recall` and `remember`, like the in-process `LastWrites`, over the table. Both run as
    the router's own sessions on the default primary (no tenant): the same connection setup
    bookkeeping as any session, so the next tenant session on that connection pays nothing
    extra."""

    def __init__(self, router: Callable[[], SessionRouter]) -> None:
        self._router = router

    async def remember(self, key: str, token: ConsistencyToken) -> None:
        """Raise `key`'s position to `token` (never lower it); failures are logged."""
        table = last_writes_table
        upsert = insert(table).values(key=key, stream=token.stream, lsn=token.lsn)
        upsert = upsert.on_conflict_do_update(
            index_elements=[table.c.key],
            set_={"stream": upsert.excluded.stream, "lsn": upsert.excluded.lsn},
            where=or_(table.c.stream != upsert.excluded.stream, table.c.lsn < upsert.excluded.lsn),
        )
        try:
            async with self._router().session() as session:
                await session.execute(upsert)
        except Exception as exc:  # the write committed: its response must not fail now
            logger.warning("could not record the last write of a tenant: %s", describe_error(exc))

    async def recall(self, key: str) -> ConsistencyToken | None:
        if key and not is_tenant_id(key):
            return None  # an id that can never exist: no query for it
        table = last_writes_table
        query = select(table.c.stream, table.c.lsn).where(table.c.key == key)
        if self._router().default_cluster.writer() is None:
            return None  # no primary now (failover, drain): no waiting on one for a hint
        try:
            async with self._router().session(_ON_THE_PRIMARY) as session:
                row = (await session.execute(query)).first()
        except Exception as exc:
            logger.warning("could not read the last write of a tenant: %s", describe_error(exc))
            return None
        return ConsistencyToken(row.stream, row.lsn) if row is not None else None


# A replica could be behind on this very row.
_ON_THE_PRIMARY = Target(intent="read", use_primary=True)
