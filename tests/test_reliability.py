"""Reliability bugs found in review of the session-opening path, each pinned by a test.

- a replica that has not replayed any commit yet reports no lag in seconds (NULL): the probe
  must not fail on it (it would abort the probe round, and the app's startup);
- the wait for room among tenant engines has one deadline, lock queueing included, and a
  drain that gives up leaves the cluster serving as before;
- the retry deadline runs from the start of the unit of work, in `session()` as in `run()`;
- connections cut without a FIN: idle ones are pinged before use, and one cut off while its
  statement runs is dropped by the kernel within `dead_connection_timeout` (a read replayed,
  a write failed, nothing committed) instead of hanging;
- sessions waiting for a full pool are served first come, first served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pg_session_router.core.errors import ConnectionLostError, DatabaseUnavailableError
from pg_session_router.core.settings import HealthSettings
from pg_session_router.db.health import ServerHealth
from pg_session_router.db.pool import WAIT_SLICE
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster
from tests.support.faults import BlackholeServer, Partition, SilentCut, eventually

from .conftest import APP_ROLE, database_settings, relayed_primary_settings


def test_a_replica_with_no_replayed_commit_yet_is_probed_without_error() -> None:
    health = ServerHealth("db:5432", make_url("postgresql+asyncpg://u@db/x"), HealthSettings())
    # What PROBE_SQL returns then: pg_last_xact_replay_timestamp() is NULL.
    row = {"in_recovery": True, "lsn": 1234, "paused": False, "lag_seconds": None}
    hidden = {"timeline": None, "sees_receiver": False}
    health.record_probe({**row, **hidden, "server_version": "15.20"}, sent_at=0.0)
    assert health.in_recovery is True and health.lag_seconds is None and health.lsn == 1234


@pytest.fixture
async def tight_engine_budget(migrated: DevCluster) -> Any:
    # acme's cluster has 3 nodes (primary + 2 replicas): it alone fills a 3-engine budget.
    router = SessionRouter(
        database_settings(migrated, tenancy={"max_engines": 3, "pool": {"size": 1, "timeout": 0.5}})
    )
    try:
        yield router
    finally:
        await router.dispose()


async def test_queued_requests_for_room_each_wait_one_timeout_and_a_failed_drain_is_undone(
    tight_engine_budget: SessionRouter,
) -> None:
    router = tight_engine_budget
    async with router.session(tenant="acme") as held:  # acme's engines stay busy
        await held.execute(text("SELECT 1"))

        async def umbrella() -> float:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailableError, match="busy"):
                async with router.session(tenant="umbrella"):
                    pass
            return time.monotonic() - started

        started = time.monotonic()
        waits = await asyncio.gather(*(umbrella() for _ in range(3)))
        assert time.monotonic() - started < 0.5 + 0.7, waits  # not 3 x the pool timeout
        # The drain gave up: acme is served at once, not parked behind it.
        opened = time.monotonic()
        async with router.session(tenant="acme", read_only=True) as again:
            await again.execute(text("SELECT 1"))
        assert time.monotonic() - opened < 0.4


async def test_the_retry_deadline_counts_from_the_start_of_the_unit_of_work(
    migrated: DevCluster,
) -> None:
    async with BlackholeServer() as blackhole:  # accepts, never answers: each try waits 1 s
        silent = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{blackhole.port}/app"
        settings = database_settings(
            migrated,
            clusters={"main": {"primary": silent}},
            tenants={},
            connect_timeout=1.0,
            retry={"deadline": 1.0},
        )
        router = SessionRouter(settings)
        started = time.monotonic()
        try:
            with pytest.raises(DatabaseUnavailableError):
                async with router.session() as session:  # checks out on its first statement
                    await session.execute(text("SELECT 1"))
        finally:
            await router.dispose()
    # One connect timeout fills the whole deadline: no second full round of retries after it.
    assert time.monotonic() - started < 1.0 + 0.7


async def test_connections_cut_without_a_fin_cost_no_request(migrated: DevCluster) -> None:
    """A NAT drops the mappings of idle pooled connections: nothing closes them, they just go
    silent. The next 30 reads and 20 writes all succeed (each write counted once): the idle
    connections are pinged at checkout and replaced, instead of hanging a first statement."""
    async with SilentCut(migrated.primary.port) as relay:
        url = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{relay.port}/app"
        settings = database_settings(
            migrated,
            replicas=False,
            clusters={"main": {"primary": url, "pool": {"ping_idle_after": 0.2}}},
        )
        router = SessionRouter(settings)
        tag = f"nofin-{time.monotonic_ns()}"
        try:

            async def write(n: int) -> None:
                async with router.session() as session:
                    await session.execute(
                        text("INSERT INTO items (name) VALUES (:n)"), {"n": f"{tag}-{n}"}
                    )

            async def read() -> int:
                async with router.session(read_only=True) as session:
                    return int(await session.scalar(text("SELECT 1")))

            await asyncio.gather(*(read() for _ in range(10)))  # a warm pool
            relay.cut()
            await asyncio.sleep(0.3)  # the stimulus: the pooled connections sit idle, cut
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(write(n) for n in range(20)),
                    *(read() for _ in range(30)),
                    return_exceptions=True,
                ),
                timeout=20,
            )
            assert [o for o in outcomes if isinstance(o, BaseException)] == []
            async with router.session() as session:
                written = await session.scalar(
                    text("SELECT count(*) FROM items WHERE name LIKE :t"), {"t": f"{tag}-%"}
                )
            assert written == 20
        finally:
            await router.dispose()


#: A statement the server is still running when the partition tests cut its connection off:
#: slow on a replica only, so that a read replayed on the primary answers at once.
SLOW_ON_A_REPLICA = text(
    "SELECT pg_sleep(CASE WHEN pg_is_in_recovery() THEN 3 ELSE 0 END), inet_server_port()"
)
DEAD_AFTER = 2.0


@pytest.fixture
async def partitioned_replica(
    migrated: DevCluster,
) -> AsyncIterator[tuple[SessionRouter, Partition]]:
    """A router whose only replica is reached through a relay that a firewall can cut off."""
    async with SilentCut(migrated.replicas[0].port) as relay:  # a plain relay: never cut()
        url = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{relay.port}/app"
        main = {"primary": migrated.url(database="app", user=APP_ROLE), "replicas": [url]}
        settings = database_settings(
            migrated, clusters={"main": main}, dead_connection_timeout=DEAD_AFTER
        )
        router = SessionRouter(settings)
        try:
            with Partition(relay.port) as partition:
                await router.start()
                yield router, partition
        finally:
            await router.dispose()


async def cut_while_running(pg: DevCluster, partition: Partition, node: str) -> float:
    """Cut once the statement runs on the server (it was sent and acknowledged); the time."""

    def running() -> bool:
        active = pg.sql(
            node.removeprefix("main."),  # the router's node name: cluster, then server
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            f"AND query LIKE 'SELECT pg_sleep%' AND application_name = 'session-router:{node}'",
        )
        return active.strip() not in ("", "0")

    await eventually(lambda: asyncio.to_thread(running), within=5, what="the statement to run")
    partition.cut()
    return time.monotonic()


async def test_a_read_cut_off_mid_statement_is_replayed_not_left_hanging(
    migrated: DevCluster, partitioned_replica: tuple[SessionRouter, Partition]
) -> None:
    """The replica's network goes away while it runs a read (no FIN, nothing acknowledged):
    with the OS defaults the read would wait for ever. The kernel drops the connection after
    `dead_connection_timeout`, and the read is replayed on the primary."""
    router, partition = partitioned_replica
    async with router.session(read_only=True) as session:
        assert session.info["node"] == "main.replica1"
        statement = asyncio.create_task(session.execute(SLOW_ON_A_REPLICA))
        cut_at = await cut_while_running(migrated, partition, "main.replica1")
        result = await asyncio.wait_for(statement, timeout=DEAD_AFTER + 10)
        assert result.one()[1] == migrated.primary.port
    # Dropped within the timeout (a probe interval late at most), then answered at once.
    assert time.monotonic() - cut_at < DEAD_AFTER + 1 + 1.5


async def test_a_write_cut_off_mid_transaction_fails_fast_and_writes_nothing(
    migrated: DevCluster, router: SessionRouter
) -> None:
    """A write whose second statement is cut off cannot be replayed (its first was sent):
    a 503-class `ConnectionLostError` after the timeout, not a hang, and nothing committed."""
    primary_relay = SilentCut(migrated.primary.port)
    async with primary_relay:
        settings = relayed_primary_settings(
            migrated, primary_relay.port, dead_connection_timeout=DEAD_AFTER
        )
        writer = SessionRouter(settings)
        tag = f"cut-write-{time.monotonic_ns()}"
        cut_at = None
        try:
            with Partition(primary_relay.port) as partition:
                with pytest.raises(ConnectionLostError):
                    async with writer.session() as session:
                        await session.execute(
                            text("INSERT INTO items (name) VALUES (:n)"), {"n": tag}
                        )
                        statement = asyncio.create_task(session.execute(text("SELECT pg_sleep(3)")))
                        cut_at = await cut_while_running(migrated, partition, "main.primary")
                        await asyncio.wait_for(statement, timeout=DEAD_AFTER + 10)
                assert cut_at is not None and time.monotonic() - cut_at < DEAD_AFTER + 1.5
        finally:
            await writer.dispose()
    async with router.session() as check:
        found = await check.scalar(text("SELECT count(*) FROM items WHERE name = :n"), {"n": tag})
    assert found == 0


async def test_sessions_waiting_for_a_full_pool_are_served_first_come_first_served(
    one_connection: SessionRouter,
) -> None:
    """Five reads queue for a one-connection pool, each waiting longer than the pool's health
    look (`WAIT_SLICE`): the connection goes to them in the order they came, never to a
    later one first (a waiter that rejoined the queue at each look would lose its place)."""
    served: list[int] = []
    primary = one_connection.node("main.primary")

    async def read(i: int) -> None:
        async with one_connection.session("replica") as session:
            await session.execute(text("SELECT 1"))
            served.append(i)

    async with one_connection.session("replica") as holder:
        await holder.execute(text("SELECT 1"))  # holds the pool's one connection
        waiters = []
        for i in range(5):
            waiters.append(asyncio.create_task(read(i)))
            # Counted in flight when routed; its first statement then waits in the pool
            # without yielding to this task before it does.
            await eventually(lambda n=i + 2: primary.in_flight == n, within=5, what="queued")
            await asyncio.sleep(WAIT_SLICE / 3)  # arrivals spread over the health looks
        await asyncio.sleep(2 * WAIT_SLICE)  # every waiter has waited past a look
    await asyncio.gather(*waiters)
    assert served == [0, 1, 2, 3, 4]


async def test_a_session_back_to_back_cannot_take_its_connection_back_from_a_waiter(
    one_connection: SessionRouter,
) -> None:
    """A loop of reads on a one-connection pool returns the connection and checks out again
    without yielding in between; a read that arrives meanwhile is served next, not after the
    loop (SQLAlchemy's queue lets the loop take the connection back before the woken waiter
    runs: the waiter starves until the loop ends, or its pool.timeout)."""
    served: list[str] = []

    async def read(who: str) -> None:
        async with one_connection.session("replica") as session:
            await session.execute(text("SELECT 1"))
        served.append(who)

    async def loop_of_reads() -> None:
        for _ in range(30):
            await read("loop")

    looping = asyncio.create_task(loop_of_reads())
    await eventually(lambda: len(served) >= 3, within=5, what="the loop reading")
    arrived_after = len(served)
    waiter = asyncio.create_task(read("waiter"))
    await asyncio.gather(looping, waiter)
    # Served right after the unit of work that held the connection when it came (or the one
    # after: the waiter's task starts at the loop's next turn).
    assert served.index("waiter") <= arrived_after + 2, served
