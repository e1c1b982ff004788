"""The test harness itself: a primary with replicas that really stream."""

from __future__ import annotations

import socket

from pg_session_router.devcluster import DevCluster


def test_replicas_stream_from_the_primary(pg: DevCluster) -> None:
    assert pg.sql("primary", "SELECT pg_is_in_recovery()") == "f"
    senders = pg.sql(
        "primary", "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    )
    assert int(senders) == len(pg.replicas) == 2
    for node in pg.replicas:
        assert pg.sql(node.name, "SELECT pg_is_in_recovery()") == "t"


def test_teardown_stops_servers_and_removes_the_folder() -> None:
    cluster = DevCluster(replicas=0).start()
    port = cluster.primary.port
    assert cluster.sql("primary", "SELECT 1") == "1"
    cluster.teardown()
    assert not cluster.base_dir.exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    cluster.teardown()  # idempotent
