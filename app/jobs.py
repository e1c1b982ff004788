"""Background work that reads what the request that enqueued it wrote.

A request's write commits, its consistency token goes along with the job (in the job's
arguments, whatever the queue), and the job reads at least that fresh: from a replica that
has replayed the write, else from the primary. Without the token, a job started a
millisecond after the COMMIT could read a replica that has not replayed it yet.

    item_id, token = await add_item_and_enqueue("acme", "invoice")   # in the request
    await count_items_job("acme", after=token)                        # in the worker
"""

from __future__ import annotations

from sqlalchemy import func, select

from app.db.session import get_db_context, get_router
from app.models import Item
from pg_session_router.db.consistency import token_of


async def add_item_and_enqueue(tenant: str, name: str) -> tuple[int, str]:
    """What a request does: write, then hand the committed write's token to the job."""
    async with get_router().session(tenant=tenant, consistency_token=True) as session:
        item = Item(name=name)
        session.add(item)
    token = token_of(session)
    return item.id, str(token)


async def count_items_job(tenant: str, after: str) -> int:
    """The job: a read that sees at least what `after` (a consistency token) committed."""
    async with get_db_context(tenant=tenant, read_only=True, after=after) as session:
        return await session.scalar(select(func.count()).select_from(Item)) or 0
