"""Failover against real nodes that the tests stop, restart, pause and cut off.

Every test leaves the shared cluster as it found it: all nodes running and streaming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.session import get_db, provider
from app.main import app
from pg_session_router.core.errors import (
    CommitOutcomeUnknownError,
    ConnectionLostError,
    DatabaseUnavailableError,
    TopologyChangedError,
)
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.targets import Target
from pg_session_router.devcluster import DevCluster
from pg_session_router.web import install_router
from tests.support.faults import WHO_ANSWERS, BlackholeServer, CommitCutter, ReadLoad, eventually

from .conftest import APP_ROLE, HEALTH_INTERVAL, database_settings, notes_cluster

# Scheduling and pg_ctl latency on a loaded 2-core machine: bounds that such a machine meets
# (bench/failover.py measures the real figures: ejection in about 0.1 s), kept well below the
# interval or deadline that would make the behaviour under test moot.
SLACK = 1.5


pytestmark = pytest.mark.usefixtures("restore_cluster")


def state_of(router: SessionRouter, node: str) -> dict[str, Any]:
    status: dict[str, Any] = router.status()["nodes"][node]
    return status


async def stop(pg: DevCluster, node: str) -> float:
    """Crash a node (immediate shutdown) without blocking the event loop; returns the time."""
    started = time.monotonic()
    await asyncio.to_thread(pg.stop_node, node, "immediate")
    return started


async def test_a_crash_between_requests_is_noticed_at_once_not_at_the_next_probe(
    pg: DevCluster,
) -> None:
    """A replica crashes while idle, its pool full of (now dead) connections and the next probe
    a minute away. The monitor's own connection closing is the sign: the server is probed and
    ejected at once, and the sessions that follow (what `get_db` gives requests, no replay)
    are served elsewhere."""
    router = SessionRouter(database_settings(pg, health={"interval": 60, "probe_timeout": 0.5}))
    await router.start()
    replica1 = router.node("main.replica1")
    try:

        async def read_on_replica1() -> None:
            async with router.session("main.replica1") as session:
                await session.execute(text("SELECT pg_sleep(0.05)"))

        await asyncio.gather(*(read_on_replica1() for _ in range(4)))
        assert replica1.engine.pool.checkedin() >= 2  # type: ignore[attr-defined]
        await stop(pg, "replica1")
        await eventually(
            lambda: state_of(router, "main.replica1")["state"] == "ejected",
            within=5,  # the next probe is 60 s away
            what="replica1 ejected without traffic, long before its next probe",
        )
        for _ in range(20):
            async with router.session("replica") as session:
                assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await router.dispose()


async def test_a_replica_dying_under_load_fails_no_reads(migrated: DevCluster) -> None:
    """20 readers through `router.run`; replica1 crashes right after a probe, so the next
    scheduled one is a whole interval away: it is ejected long before that, no read fails, and
    after its restart it serves again."""
    pg = migrated
    interval = 3.0
    router = SessionRouter(
        database_settings(pg, health={"interval": interval, "probe_timeout": 0.5})
    )
    replica1 = pg.nodes["replica1"].port
    try:
        await router.start()
        async with ReadLoad(router, tasks=20) as load:
            await eventually(lambda: load.ports[replica1] > 20, within=5, what="reads on replica1")
            probes = state_of(router, "main.replica1")["probes"]
            await eventually(
                lambda: state_of(router, "main.replica1")["probes"] > probes,
                within=interval + SLACK,
                what="a scheduled probe of replica1",
            )
            assert state_of(router, "main.replica1")["state"] == "up"
            stop_issued = time.time()
            await stop(pg, "replica1")
            await eventually(
                lambda: state_of(router, "main.replica1")["state"] == "ejected",
                within=interval,
                what="replica1 ejected",
            )
            ejected = state_of(router, "main.replica1")
            # Ejected by this crash, and well before the next scheduled probe could have done it.
            assert stop_issued <= ejected["since"] < stop_issued + interval / 2
            assert ejected["reason"]
            reads_before = load.total
            await eventually(lambda: load.total > reads_before + 200, within=5, what="more reads")
            await asyncio.to_thread(pg.start_node, "replica1")
            restarted_at = time.monotonic()
            await eventually(
                lambda: load.served_by(replica1, after=restarted_at),
                within=2 * interval + SLACK,
                what="replica1 serving reads again",
            )
        assert load.failures == []
        assert state_of(router, "main.replica1")["state"] == "up"
    finally:
        await router.dispose()


async def test_a_read_queued_for_a_dying_replicas_pool_is_served_elsewhere_at_once(
    pg: DevCluster,
) -> None:
    """A read waits for a slot in a replica's full pool when the replica crashes. The wait ends
    when the server is ejected, and the read is replayed on the primary: it does not wait out
    `pool.timeout` for a connection that would only fail (the held one never comes back)."""
    settings = database_settings(pg)
    main = settings.clusters["main"]
    pool = main.pool.model_copy(update={"size": 1, "max_overflow": 0, "timeout": 30.0})
    one_replica = main.model_copy(update={"pool": pool, "replicas": main.replicas[:1]})
    router = SessionRouter(settings.model_copy(update={"clusters": {"main": one_replica}}))
    await router.start()
    replica1 = router.node("main.replica1")
    try:
        async with router.session("replica") as holder:  # holds the pool's one connection
            assert await holder.scalar(WHO_ANSWERS) == pg.nodes["replica1"].port

            async def queued_read() -> int:
                async with router.session("replica") as session:
                    return int(await session.scalar(WHO_ANSWERS))

            waiter = asyncio.create_task(queued_read())
            # Counted in flight when routed; its first statement then waits in the pool
            # without yielding to this task before it does.
            await eventually(lambda: replica1.in_flight == 2, within=5, what="a queued read")
            stopped = await stop(pg, "replica1")
            port = await asyncio.wait_for(waiter, timeout=10)  # pool.timeout is 30 s
            served_after = time.monotonic() - stopped
        assert port == pg.nodes["primary"].port
        assert served_after < 2 * SLACK  # pg_ctl's stop, the ejection, one slice, the replay
        assert state_of(router, "main.replica1")["state"] == "ejected"
    finally:
        await router.dispose()


def readers_app() -> FastAPI:
    """A route as users write it: plain `Depends(get_db)`, one session, no replay."""
    checks = FastAPI()
    install_router(checks, provider=provider)

    @checks.get("/who")
    async def who(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, int]:
        await db.execute(text("SELECT pg_sleep(0.005)"))
        return {"port": int(await db.scalar(WHO_ANSWERS))}

    return checks


async def test_sessions_opened_after_a_replica_crash_all_succeed_without_replay(
    router: SessionRouter, pg: DevCluster
) -> None:
    """What `get_db` gives a request is one session, never replayed. A replica crashes under 20
    readers (10 over HTTP, 10 plain `router.session`): every session opened after the crash is
    served (the checkout finds the dead connections, the node is ejected, another serves). A
    read caught mid-query by the crash may fail, but as `ConnectionLostError`, a 503 with
    Retry-After over HTTP."""
    replica1 = pg.nodes["replica1"].port
    # (when the read started, its outcome): a port, or the failure (a response or exception)
    outcomes: list[tuple[float, object]] = []
    stopping = False

    async def http_reader(client: httpx.AsyncClient) -> None:
        while not stopping:
            started = time.monotonic()
            try:
                response = await client.get("/who")
            except Exception as exc:  # judged below
                outcomes.append((started, exc))
                continue
            ok = response.status_code == 200
            outcomes.append((started, response.json()["port"] if ok else response))

    async def session_reader() -> None:
        while not stopping:
            started = time.monotonic()
            try:
                async with router.session("replica") as session:
                    await session.execute(text("SELECT pg_sleep(0.005)"))
                    port = int(await session.scalar(WHO_ANSWERS))
            except Exception as exc:  # judged below
                outcomes.append((started, exc))
            else:
                outcomes.append((started, port))

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=readers_app()), base_url="http://test"
    ) as client:
        readers = [asyncio.create_task(http_reader(client)) for _ in range(10)]
        readers += [asyncio.create_task(session_reader()) for _ in range(10)]
        try:
            await eventually(
                lambda: sum(1 for _, port in outcomes if port == replica1) > 20,
                within=5,
                what="reads on replica1",
            )
            await stop(pg, "replica1")
            crashed_at = time.monotonic()
            await eventually(
                lambda: sum(1 for at, _ in outcomes if at > crashed_at) > 300,
                within=10,
                what="reads after the crash",
            )
        finally:
            stopping = True
            await asyncio.gather(*readers)

    opened_after = [outcome for at, outcome in outcomes if at > crashed_at]
    failed_after = [outcome for outcome in opened_after if not isinstance(outcome, int)]
    assert failed_after == []
    assert state_of(router, "main.replica1")["state"] == "ejected"
    for _, outcome in outcomes:
        if isinstance(outcome, httpx.Response):
            assert outcome.status_code == 503, outcome.text
            assert outcome.json()["error"] == "connection_lost"
            assert outcome.headers["Retry-After"].isdigit()
        elif isinstance(outcome, BaseException):
            assert isinstance(outcome, ConnectionLostError), repr(outcome)


async def test_a_read_whose_connection_dies_before_it_ends_still_succeeds(
    router: SessionRouter, pg: DevCluster
) -> None:
    checks = FastAPI()
    install_router(checks, provider=provider)

    @checks.get("/dies")
    async def dies(db: Annotated[AsyncSession, Depends(get_db)]) -> dict[str, str]:
        pid = await db.scalar(text("SELECT pg_backend_pid()"))
        node = db.info["node"].split(".")[1]
        raw = (await (await db.connection()).get_raw_connection()).driver_connection
        assert raw is not None
        await asyncio.to_thread(pg.sql, node, f"SELECT pg_terminate_backend({pid})")
        await eventually(raw.is_closed, within=5, what="the session's connection to close")
        return {"status": "read done"}

    transport = httpx.ASGITransport(app=checks, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/dies")
    # The read had its rows; its connection died after: discarded, and the request succeeds.
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "read done"}


async def test_terminated_backends_fail_no_requests(router: SessionRouter, pg: DevCluster) -> None:
    kill = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE 'session-router:%' AND pid <> pg_backend_pid()"
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:

        async def burst() -> list[int]:
            requests = [
                client.post("/items", json={"name": "after-kill"}, headers={"X-Tenant-ID": tenant})
                for tenant in ("acme", "globex", "initech")
            ] * 4
            requests += [
                client.get("/items?limit=1", headers={"X-Tenant-ID": tenant})
                for tenant in ("acme", "globex", "initech")
            ] * 4
            return [response.status_code for response in await asyncio.gather(*requests)]

        assert set(await burst()) == {200, 201}  # pools now hold idle connections everywhere
        killed = 0
        for node in pg.nodes:
            killed += int(await asyncio.to_thread(pg.sql, node, kill))
        assert killed >= 3
        assert set(await burst()) == {200, 201}

        async with ReadLoad(router, tasks=20) as load:
            await eventually(lambda: load.total > 100, within=5, what="read load")
            for _ in range(3):
                for node in pg.nodes:
                    await asyncio.to_thread(pg.sql, node, kill)
                before = load.total
                await eventually(
                    lambda b=before: load.total > b + 100,
                    within=5,  # type: ignore[misc]
                    what="reads after the kill",
                )
    assert load.failures == []


async def test_a_replica_whose_replay_is_paused_stops_receiving_reads(
    migrated: DevCluster,
) -> None:
    pg = migrated
    settings = database_settings(
        pg, routing={"max_replica_lag_bytes": 256 * 1024, "max_replica_lag_seconds": None}
    )
    router = SessionRouter(settings)
    replica1 = pg.nodes["replica1"].port
    try:
        await router.start()
        await asyncio.to_thread(pg.pause_replay, "replica1")
        async with router.session() as session:  # about 3 MB of WAL
            await session.execute(
                text(
                    "INSERT INTO items (name) SELECT 'lag-' || repeat('x', 150) "
                    "FROM generate_series(1, 12000)"
                )
            )
        await eventually(
            lambda: not state_of(router, "main.replica1")["fresh"],
            within=5,
            what="replica1 marked lagging",
        )
        async with ReadLoad(router, tasks=5) as load:
            await eventually(lambda: load.total >= 100, within=5, what="reads")
        assert load.ports[replica1] == 0
        assert load.failures == []

        await asyncio.to_thread(pg.resume_replay, "replica1")
        await eventually(
            lambda: state_of(router, "main.replica1")["fresh"], within=5, what="replica1 caught up"
        )
        async with ReadLoad(router, tasks=5) as load:
            await eventually(lambda: load.ports[replica1] > 0, within=2, what="replica1 reads")
        assert load.failures == []
    finally:
        async with router.session() as session:
            await session.execute(text("DELETE FROM items WHERE name LIKE 'lag-%'"))
        await router.dispose()


async def test_without_fallback_no_fresh_replica_means_unavailable(
    migrated: DevCluster,
) -> None:
    settings = database_settings(
        migrated, replicas=False, routing={"fallback_to_primary": False}, retry={"deadline": 0.3}
    )
    router = SessionRouter(settings)
    try:
        with pytest.raises(DatabaseUnavailableError, match="no fresh replica"):
            async with router.session("replica"):
                pass
        async with router.session("primary") as session:  # writes are unaffected
            assert await session.scalar(text("SELECT 1")) == 1
    finally:
        await router.dispose()


async def test_primary_down_writes_fail_fast_reads_continue_then_writes_recover(
    router: SessionRouter, pg: DevCluster
) -> None:
    settings = router.settings
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        await stop(pg, "primary")
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):
            async with router.session() as session:
                await session.execute(text("SELECT 1"))
        assert (
            time.monotonic() - started < settings.connect_timeout + settings.retry.deadline + SLACK
        )

        response = await client.post(
            "/items", json={"name": "during-outage"}, headers={"X-Tenant-ID": "initech"}
        )
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert response.json()["error"] in {"database_unavailable", "no_node_available"}

        async with ReadLoad(router, tasks=10) as load:
            await eventually(lambda: load.total >= 200, within=5, what="reads during outage")
        assert load.failures == []
        reads = await client.get("/items?limit=1", headers={"X-Tenant-ID": "initech"})
        assert reads.status_code == 200
        health = await client.get("/health/db")
        assert (health.status_code, health.json()["status"]) == (503, "down")

        await asyncio.to_thread(pg.start_node, "primary")
        restarted = time.monotonic()

        async def write_succeeds() -> bool:
            response = await client.post(
                "/items", json={"name": "after-outage"}, headers={"X-Tenant-ID": "initech"}
            )
            return response.status_code == 201

        await eventually(
            write_succeeds,
            within=2 * HEALTH_INTERVAL + settings.retry.deadline,
            what="writes after the primary restarts",
        )
        assert time.monotonic() - restarted < 2 * HEALTH_INTERVAL + settings.retry.deadline


async def test_a_server_that_never_answers_cannot_hang_a_request(migrated: DevCluster) -> None:
    async with BlackholeServer() as blackhole:
        silent = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{blackhole.port}/app"
        settings = database_settings(migrated, clusters={"main": {"primary": silent}}, tenants={})
        router = SessionRouter(settings)
        started = time.monotonic()
        try:
            with pytest.raises(DatabaseUnavailableError):
                async with router.session() as session:  # checks out on its first statement
                    await session.execute(text("SELECT 1"))
        finally:
            await router.dispose()
        elapsed = time.monotonic() - started
        assert blackhole.accepted >= 1
        assert elapsed < settings.connect_timeout + settings.retry.deadline + SLACK


async def test_a_connection_lost_during_commit_is_an_unknown_outcome_never_replayed(
    migrated: DevCluster,
) -> None:
    async with CommitCutter(migrated.primary.port) as cutter:
        via_proxy = f"postgresql+asyncpg://{APP_ROLE}@127.0.0.1:{cutter.port}/app"
        settings = database_settings(
            migrated, clusters={"main": {"primary": via_proxy}}, tenants={}
        )
        router = SessionRouter(settings)
        try:

            async def insert(session: Any) -> None:
                await session.execute(text("INSERT INTO items (name) VALUES ('cut-commit')"))
                cutter.armed = True

            with pytest.raises(CommitOutcomeUnknownError, match="may or may not"):
                await router.run(insert)
            assert cutter.cuts == 1  # run() did not replay it
            cutter.armed = False
            async with router.session() as session:
                written = await session.scalar(
                    text("SELECT count(*) FROM items WHERE name = 'cut-commit'")
                )
                await session.execute(text("DELETE FROM items WHERE name = 'cut-commit'"))
            assert written is not None and written <= 1
        finally:
            await router.dispose()


async def test_a_write_on_a_node_that_is_read_only_is_a_topology_change(
    migrated: DevCluster,
) -> None:
    """The router last saw replica1 as a primary (a failover happened since its last probe, and
    the next one is a minute away). A write that reaches it marks it as a replica and wakes the
    monitor: the change is the write's doing, not a scheduled probe's."""
    router = SessionRouter(
        database_settings(migrated, health={"interval": 60, "probe_timeout": 0.5})
    )
    try:
        await router.start()
        health = router.node("main.replica1").health
        # start() probes once and starts the monitor, whose loop probes again at once; after
        # that the next probe is a minute away.
        await eventually(lambda: health.probes >= 2, within=5, what="the monitor's first round")
        health.in_recovery = False  # what a probe before a failover would have left behind
        assert state_of(router, "main.replica1")["role"] == "primary"
        probes = health.probes
        with pytest.raises(TopologyChangedError, match="no longer a primary"):
            async with router.session(Target(node="main.replica1", intent="write")) as session:
                await session.execute(text("INSERT INTO items (name) VALUES ('misrouted')"))
        assert state_of(router, "main.replica1")["role"] == "replica"
        await eventually(
            lambda: health.probes > probes, within=5, what="the monitor woken by the write"
        )
        assert state_of(router, "main.replica1")["role"] == "replica"
    finally:
        await router.dispose()


@pytest.fixture
def small_cluster() -> Iterator[DevCluster]:
    """A cluster of its own: promotion is a one-way trip."""
    with notes_cluster(1) as cluster:
        yield cluster


@pytest.fixture
async def discovering_router(small_cluster: DevCluster) -> AsyncIterator[SessionRouter]:
    """Nodes listed without roles: the router finds the primary by probing."""
    nodes = [
        small_cluster.url(name, database="app", user=APP_ROLE) for name in ("replica1", "primary")
    ]
    # A retry deadline well above the promotion bound the test asserts, so that the bound, not
    # the deadline, is what a slow discovery would fail.
    settings = database_settings(
        small_cluster, clusters={"main": {"nodes": nodes}}, tenants={}, retry={"deadline": 10.0}
    )
    router = SessionRouter(settings)
    await router.start()
    try:
        yield router
    finally:
        await router.dispose()


async def test_roles_are_discovered_and_a_promoted_replica_takes_the_writes(
    discovering_router: SessionRouter, small_cluster: DevCluster
) -> None:
    router = discovering_router
    old_primary, replica = small_cluster.nodes["primary"].port, small_cluster.nodes["replica1"].port
    where = text("SELECT inet_server_port()")
    async with router.session() as session:
        assert await session.scalar(where) == old_primary
    async with router.session("replica") as session:
        assert await session.scalar(where) == replica

    await asyncio.to_thread(small_cluster.stop_node, "primary")
    await asyncio.to_thread(small_cluster.promote, "replica1")
    promoted_at = time.monotonic()

    async def insert(session: Any) -> int:
        await session.execute(text("INSERT INTO notes VALUES ('after promotion')"))
        return int(await session.scalar(where))

    port = await router.run(insert)
    assert port == replica
    # README: "within about two health intervals"; a loaded machine gets SLACK on top.
    assert time.monotonic() - promoted_at < 2 * HEALTH_INTERVAL + SLACK
    assert state_of(router, "main.node1")["role"] == "primary"


async def test_an_old_primary_started_again_as_a_primary_gets_no_write(
    small_cluster: DevCluster,
) -> None:
    pg = small_cluster
    # The old primary listed first: before timelines counted, the first writable node listed
    # took the writes.
    nodes = [pg.url(name, database="app", user=APP_ROLE) for name in ("primary", "replica1")]
    settings = database_settings(
        pg, clusters={"main": {"nodes": nodes}}, tenants={}, retry={"deadline": 5.0}
    )
    router = SessionRouter(settings)
    await router.start()
    where = text("SELECT inet_server_port()")

    async def insert(session: Any) -> int:
        await session.execute(text("INSERT INTO notes VALUES ('split brain')"))
        return int(await session.scalar(where))

    try:
        await asyncio.to_thread(pg.stop_node, "primary", mode="fast")
        await asyncio.to_thread(pg.promote, "replica1")
        promoted = pg.nodes["replica1"].port
        assert await router.run(insert) == promoted
        # A split brain: the old primary starts again out of recovery, on the old timeline.
        await asyncio.to_thread(pg.start_node, "primary")
        await eventually(
            lambda: (
                state_of(router, "main.node1")["state"] == "up"
                and state_of(router, "main.node1")["role"] == "primary"
            ),
            within=10,
            what="the old primary seen as a primary again",
        )
        for _ in range(10):
            assert await router.run(insert) == promoted
        assert router.status()["nodes"]["main.node2"]["timeline"] == 2
        # Nor while the new primary is down: writes wait for it (here, in vain).
        await asyncio.to_thread(pg.stop_node, "replica1")
        with pytest.raises(DatabaseUnavailableError):
            await router.run(insert)
        count = "SELECT count(*) FROM notes WHERE body = 'split brain'"
        assert pg.sql("primary", count, database="app") == "0"
    finally:
        await router.dispose()


#: A role that may read `pg_stat_wal_receiver` (a replica's timeline); `APP_ROLE` may not.
STATS_ROLE = "app_stats"


@pytest.fixture
def forking_cluster() -> Iterator[DevCluster]:
    """A cluster of its own with two replicas: one to promote, one left following the old
    primary."""
    with notes_cluster(2, STATS_ROLE) as cluster:
        cluster.sql("primary", f"GRANT pg_read_all_stats TO {STATS_ROLE}")
        yield cluster


async def test_a_replica_the_new_primary_does_not_feed_serves_no_read_until_it_follows(
    forking_cluster: DevCluster,
) -> None:
    pg = forking_cluster
    # Two routers watch the same failover: one whose role sees replicas' timelines, one not.
    routers: dict[bool, SessionRouter] = {}
    for visible, role in ((False, APP_ROLE), (True, STATS_ROLE)):
        nodes = [pg.url(name, database="app", user=role) for name in pg.nodes]
        routers[visible] = SessionRouter(
            database_settings(
                pg, clusters={"main": {"nodes": nodes}}, tenants={}, retry={"deadline": 10.0}
            )
        )
        await routers[visible].start()

    async def probe() -> None:
        for router in routers.values():
            await router.monitor.probe_round()

    async def no_read_misses_the_row(left_behind: str) -> None:
        await probe()  # judged with the new writer known
        for router in routers.values():
            for _ in range(20):
                _, seen = await read_once(router)
                assert seen == 1
            assert not router.status()["nodes"][left_behind]["fresh"]

    async def serves_the_row(name: str) -> None:
        port = pg.nodes[name].port
        for router in routers.values():

            async def served(router: SessionRouter = router) -> bool:
                return await read_once(router) == (port, 1)

            await eventually(served, within=20, what=f"reads on {name} again")

    async def insert(session: Any) -> None:
        await session.execute(text("INSERT INTO notes VALUES ('after failover')"))

    try:
        # replica2 receives the old primary's last WAL without replaying it yet: replayed
        # after the failover, that backlog moves its position on, and must not pass for
        # following the new primary.
        await asyncio.to_thread(pg.pause_replay, "replica2")
        await asyncio.to_thread(pg.sql, "primary", "CREATE TABLE backlog ()", database="app")
        # A fast shutdown hands both replicas the last WAL: neither holds anything the new
        # primary lacks, and both can follow its timeline later.
        await asyncio.to_thread(pg.stop_node, "primary", mode="fast")
        await asyncio.to_thread(pg.promote, "replica1")
        await routers[False].run(insert)
        await probe()  # the new writer seen
        await asyncio.to_thread(pg.resume_replay, "replica2")
        caught_up = "SELECT pg_last_wal_replay_lsn() = pg_last_wal_receive_lsn()"
        await eventually(
            lambda: pg.sql("replica2", caught_up) == "t", within=10, what="backlog replayed"
        )
        # replica2 still waits for the old primary: its reads would never see the row. No lag
        # figure shows it (it replayed all it received, and is bytes behind, not megabytes).
        await no_read_misses_the_row("main.node3")
        await asyncio.to_thread(pg.follow, "replica2", "replica1")
        await serves_the_row("replica2")

        # The old primary back in recovery, fed by nobody: once the writer, it is not trusted
        # on sight either.
        await asyncio.to_thread(pg.start_as_standby, "primary")
        for router in routers.values():
            await eventually(
                lambda router=router: state_of(router, "main.node1")["in_recovery"] is True,
                within=10,
                what="the old primary seen in recovery",
            )
        await no_read_misses_the_row("main.node1")
        await asyncio.to_thread(pg.follow, "primary", "replica1")
        await serves_the_row("primary")

        # Where the role may see them, the replicas' timelines are the new primary's.
        for visible, router in routers.items():
            for node in ("main.node1", "main.node3"):
                assert state_of(router, node)["timeline"] == (2 if visible else None)
    finally:
        for router in routers.values():
            await router.dispose()


async def read_once(router: SessionRouter) -> tuple[int, int]:
    """A replica read: the server that answered, and whether it has the row."""
    read = text("SELECT inet_server_port(), count(*) FROM notes WHERE body = 'after failover'")
    async with router.session("replica") as session:
        port, seen = (await session.execute(read)).one()
        return int(port), int(seen)
