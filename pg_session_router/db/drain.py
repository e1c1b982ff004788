"""Taking a server out of rotation for maintenance, and back: `router.drain`, `router.undrain`.

A drained server gets no new session from this process: reads go to the other replicas (or
the primary, by the fallback rule), writes wait for another writer within `retry.deadline`
(a planned switchover: drain the primary, promote a replica, and writes pause instead of
failing), explicit node targets are refused. Draining waits for the sessions already on the
server to end, up to a deadline, then closes its pools. It acts on the *server*: every node on
it (the cluster's own, and tenant databases on it) is drained together, since maintenance
takes the whole server. Each process drains its own routers: the admin endpoint
(`web/admin.py`) drains the process that answers.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

from pg_session_router.db.cluster import Node
from pg_session_router.db.topology import Topology

_POLL = 0.01


@dataclass(frozen=True, slots=True)
class DrainReport:
    pid: int  # the process drained: each process drains its own routers
    node: str
    nodes: list[str]  # every node on the same server, drained together
    sessions_left: int  # still running at the deadline (their connections close when they end)
    seconds: float


def nodes_on_server(topology: Topology, node: Node) -> list[Node]:
    return [other for other in topology.nodes.values() if other.health is node.health]


async def drain(topology: Topology, name: str, *, within: float) -> DrainReport:
    started = time.monotonic()
    node = topology.node(name)  # TargetError for an unknown name
    node.health.drained = True
    nodes = nodes_on_server(topology, node)
    deadline = started + within
    # Sessions are counted from the moment they are routed (a read checks its connection out
    # only at its first statement). Polled: a drain is rare.
    while time.monotonic() < deadline:
        if not any(n.in_flight for n in nodes):
            break
        await asyncio.sleep(_POLL)
    left = sum(n.in_flight for n in nodes)
    # Idle connections close now; one still checked out closes when its session ends, and a
    # session waiting for one goes elsewhere (`RouterPool.retired`). Shielded: a drain whose
    # caller gives up now still closes every node's pool, not only the first ones.
    await asyncio.shield(_dispose_all(nodes))
    names = sorted(n.name for n in nodes)
    return DrainReport(os.getpid(), name, names, left, time.monotonic() - started)


async def _dispose_all(nodes: list[Node]) -> None:
    for node in nodes:
        await node.dispose()


def undrain(topology: Topology, name: str) -> list[str]:
    node = topology.node(name)
    node.health.drained = False
    return sorted(n.name for n in nodes_on_server(topology, node))
