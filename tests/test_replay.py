"""A dead connection costs no request: statements are replayed on a fresh connection.

Backends are terminated while the event loop is busy (asyncpg has not read the EOF yet, so the
pool hands the dead connections out), and a replica dies under readers running multi-statement
reads through plain sessions, the way `get_db` reads. Reads replay any statement; writes only
their first (nothing can have been written), and are counted exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, text

from app.main import app
from app.models import Item
from pg_session_router.core.errors import ConnectionLostError
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.conftest import primary_only_settings, two_slot_role
from tests.support.faults import WHO_ANSWERS, eventually

pytestmark = pytest.mark.usefixtures("restore_cluster")

KILL = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE application_name LIKE 'session-router:main%' AND pid <> pg_backend_pid()"
)


async def test_backends_terminated_while_the_loop_is_busy_fail_no_request(
    router: SessionRouter, pg: DevCluster
) -> None:
    marker = f"busy-{uuid.uuid4().hex[:8]}"

    async def read() -> int:
        async with router.session("replica") as session:
            return int(await session.scalar(WHO_ANSWERS))

    async def write(i: int) -> None:
        async with router.session() as session:
            await session.execute(
                text("INSERT INTO items (name) VALUES (:name)"), {"name": f"{marker}-{i}"}
            )

    await asyncio.gather(*(read() for _ in range(30)), *(write(i) for i in range(20)))
    # A blocking call: the loop reads no EOF while the servers close every pooled connection.
    for node in pg.nodes:
        pg.sql(node, KILL)
    results = await asyncio.gather(
        *(read() for _ in range(30)),
        *(write(100 + i) for i in range(20)),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], failures
    async with router.session() as session:
        written = await session.scalar(
            text("SELECT count(*) FROM items WHERE name LIKE :m"), {"m": f"{marker}-1__"}
        )
        await session.execute(text("DELETE FROM items WHERE name LIKE :m"), {"m": f"{marker}%"})
    assert written == 20  # each write exactly once


async def test_a_replica_dying_under_multi_statement_reads_fails_none(
    router: SessionRouter, pg: DevCluster
) -> None:
    """Plain sessions, no `router.run`: statements that find the replica's connection dead are
    replayed on the other replica or the primary."""
    served: list[int] = []
    failures: list[BaseException] = []
    stopping = asyncio.Event()

    async def reader() -> None:
        while not stopping.is_set():
            try:
                async with router.session("replica") as session:
                    for _ in range(3):
                        served.append(int(await session.scalar(WHO_ANSWERS)))
                        await session.execute(text("SELECT pg_sleep(0.002)"))
            except Exception as exc:  # every failure is what the test counts
                failures.append(exc)

    readers = [asyncio.create_task(reader()) for _ in range(20)]
    try:
        replica1 = pg.nodes["replica1"].port
        await eventually(lambda: served.count(replica1) > 30, within=10, what="reads on it")
        await asyncio.to_thread(pg.stop_node, "replica1", "immediate")
        before = len(served)
        await eventually(lambda: len(served) > before + 300, within=15, what="reads after")
    finally:
        stopping.set()
        await asyncio.gather(*readers)
    assert failures == [], failures[:3]


async def test_replicas_killed_and_restarted_under_http_readers_answer_only_2xx(
    router: SessionRouter, pg: DevCluster
) -> None:
    """Through the example app (`get_db`, a schema tenant), replicas crash and come back one
    after the other under 16 readers: no response other than a 2xx."""
    statuses: list[int] = []
    stopping = asyncio.Event()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def reader() -> None:
            while not stopping.is_set():
                response = await client.get("/items?limit=5", headers={"X-Tenant-ID": "globex"})
                statuses.append(response.status_code)

        readers = [asyncio.create_task(reader()) for _ in range(16)]
        try:
            for name in ("replica1", "replica2", "replica1"):
                await eventually(lambda: len(statuses) > 100, within=10, what="reads")
                await asyncio.to_thread(pg.stop_node, name, "immediate")
                before = len(statuses)
                await eventually(lambda b=before: len(statuses) > b + 100, within=15, what="reads")
                await asyncio.to_thread(pg.start_node, name)
                await asyncio.to_thread(pg.wait_streaming)
        finally:
            stopping.set()
            await asyncio.gather(*readers)
    assert len(statuses) > 300
    assert {s for s in statuses if not 200 <= s < 300} == set()


async def terminate_own_backend(session: Any, pg: DevCluster, node: str) -> None:
    """Kill the session's backend (through the server, not through the session: using its
    connection directly would make the session opaque to replay) and wait until it is gone."""
    pid = await session.scalar(text("SELECT pg_backend_pid()"))
    await asyncio.to_thread(pg.sql, node, f"SELECT pg_terminate_backend({pid})")
    alive = f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"

    async def gone() -> bool:
        return await asyncio.to_thread(pg.sql, node, alive) == "0"

    await eventually(gone, within=5, what="the backend to end")


async def kill_pooled_connection_unnoticed(router: SessionRouter, pg: DevCluster) -> None:
    """The pool's one connection is terminated by a blocking call: the event loop has not
    read the EOF when the next session checks the connection out."""
    async with router.session() as session:
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
    pg.sql("primary", f"SELECT pg_terminate_backend({pid})")


async def test_a_write_with_pending_changes_is_never_replayed_without_them(
    one_connection: SessionRouter, pg: DevCluster
) -> None:
    """The autoflush of the first statement sends the pending INSERT on a dead connection: a
    replay would run the statement without it (a rollback discards pending objects) and then
    commit "successfully"."""
    name = f"pending-{uuid.uuid4().hex[:8]}"
    await kill_pooled_connection_unnoticed(one_connection, pg)
    with pytest.raises(ConnectionLostError):
        async with one_connection.session() as session:
            session.add(Item(name=name))
            await session.execute(text("SELECT 1"))
    async with one_connection.session() as session:
        assert await session.scalar(select(func.count()).where(Item.name == name)) == 0


async def test_a_fresh_write_whose_connection_died_is_replayed(
    one_connection: SessionRouter, pg: DevCluster
) -> None:
    name = f"fresh-{uuid.uuid4().hex[:8]}"
    await kill_pooled_connection_unnoticed(one_connection, pg)
    async with one_connection.session() as session:
        await session.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
    async with one_connection.session() as session:
        assert await session.scalar(select(func.count()).where(Item.name == name)) == 1
        await session.execute(text("DELETE FROM items WHERE name = :n"), {"n": name})


async def test_inside_the_callers_begin_block_a_dead_connection_is_a_503_not_a_500(
    one_connection: SessionRouter, pg: DevCluster
) -> None:
    await kill_pooled_connection_unnoticed(one_connection, pg)
    with pytest.raises(ConnectionLostError):
        async with one_connection.session() as session, session.begin():
            await session.execute(text("SELECT 1"))


async def test_objects_a_read_already_returned_stay_usable_after_a_replay(
    router: SessionRouter, pg: DevCluster
) -> None:
    async with router.session() as session:  # a row to read
        session.add(Item(name="survivor"))
    pg.wait_replayed()
    async with router.session("primary", read_only=True) as session:
        item = (await session.scalars(select(Item).where(Item.name == "survivor"))).first()
        assert item is not None
        await terminate_own_backend(session, pg, "primary")
        assert await session.scalar(text("SELECT 7")) == 7  # replayed
        assert item.name == "survivor"  # still loaded, not expired


@pytest.mark.parametrize("consistency_token", [False, True], ids=["plain", "with-token"])
async def test_a_write_whose_first_contact_is_its_flush_waits_for_a_connection_slot(
    migrated: DevCluster, consistency_token: bool
) -> None:
    """`add()`, then the COMMIT at the end of the unit of work: the first thing sent is the
    flush. The server refuses the connection (too many connections, SQLSTATE 53300) when the
    flush comes: the checkout before the flush is retried until a slot frees, and the row is
    written once. Without that checkout, the refusal surfaced from the COMMIT as an unknown
    outcome (503) though nothing had been sent."""
    pg = migrated
    role, url = two_slot_role(pg, "flush")
    router = SessionRouter(primary_only_settings(pg, url, retry={"deadline": 10.0}))
    hog: asyncpg.Connection | None = None
    name = f"flush-first-{uuid.uuid4().hex[:8]}"
    try:
        await router.start()  # its probe connection takes the first slot
        hog = await asyncpg.connect(url.replace("+asyncpg", ""))  # and this one the second

        async def free_a_slot_later() -> None:
            await asyncio.sleep(0.5)
            assert hog is not None
            await hog.close()

        freeing = asyncio.create_task(free_a_slot_later())
        async with router.session(consistency_token=consistency_token) as session:
            session.add(Item(name=name))
        await freeing
        assert ("consistency_token" in session.info) is consistency_token
        async with router.session() as session:
            assert await session.scalar(select(func.count()).where(Item.name == name)) == 1
            await session.execute(text("DELETE FROM items WHERE name = :n"), {"n": name})
    finally:
        if hog is not None and not hog.is_closed():
            await hog.close()
        await router.dispose()
        pg.sql("primary", f"DROP ROLE IF EXISTS {role}")
