"""The routing decision: a target and the health the monitor last saw -> one node.

Pure: no I/O and no awaits, only attribute reads on clusters and nodes, so it costs
microseconds and is tested without a server (`tests/test_routing_decision.py`). Writes go to
the cluster's writer. Reads go to a fresh, healthy replica by the cluster's policy, else to the
writer in a READ ONLY transaction (unless `routing.fallback_to_primary` is off). A read with a
consistency token goes only where that WAL position has been replayed, else to the writer.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pg_session_router.core.errors import NoNodeAvailableError
from pg_session_router.db.cluster import Cluster, Node
from pg_session_router.db.targets import Target
from pg_session_router.db.tenancy import Placement

#: Why a session went where it went: a bounded set, fit for a metrics label.
#: write: a write, on the cluster's primary; primary-requested: a read that asked for it;
#: explicit-node: the target named the node; replica: a fresh, healthy replica;
#: consistency-token: no replica had replayed the read's token, so the primary;
#: consistency-token-waited: a replica caught up with the token within the bounded wait;
#: fallback-no-replica / fallback-lag / fallback-circuit-open: no replica configured / every
#: replica up lags too far / every replica ejected, so the primary, READ ONLY.
RouteReason = Literal[
    "write",
    "primary-requested",
    "explicit-node",
    "replica",
    "consistency-token",
    "consistency-token-waited",
    "fallback-no-replica",
    "fallback-lag",
    "fallback-circuit-open",
]


class Route(NamedTuple):
    """The outcome of routing one target: which node, in which mode, for which tenant, why.

    A named tuple: one is built for every unit of work, and a frozen dataclass's `__init__`
    pays an `object.__setattr__` call per field."""

    cluster: Cluster
    node: Node
    read_only: bool
    placement: Placement | None
    reason: RouteReason = "write"
    #: The WAL position the read's consistency token asks for (None: no token).
    min_lsn: int | None = None


def route_in_cluster(cluster: Cluster, target: Target, placement: Placement | None) -> Route:
    """The node of `cluster` that serves `target`, or `NoNodeAvailableError` saying why."""
    node: Node | None
    reason: RouteReason
    floor = None if target.after is None else min_lsn(cluster, target)
    read_only = target.read_only
    if read_only and not target.use_primary:
        node, reason = cluster.choose_reader(floor)
    else:
        node, reason = cluster.writer(), "primary-requested" if read_only else "write"
    if node is None:
        raise NoNodeAvailableError(why_unavailable(cluster, target))
    return Route(cluster, node, read_only, placement, reason, floor)


def min_lsn(cluster: Cluster, target: Target) -> int | None:
    """The WAL position a read must wait for on this cluster, if its token is about it."""
    token = target.after
    # A token of another WAL stream says nothing about this cluster's replicas.
    if token is None or token.stream != cluster.key.stream:
        return None
    return token.lsn


def why_unavailable(cluster: Cluster, target: Target) -> str:
    """For logs and operators: what was wanted, and the state of every node."""
    if not target.read_only or target.use_primary:
        wanted = "writable primary"
    elif cluster.fallback_to_primary:
        wanted = "fresh replica or primary"
    else:
        wanted = "fresh replica (routing.fallback_to_primary is off)"
    states = []
    for node in cluster.nodes:
        health = node.health
        state = health.reason if not health.up else None
        if state is None and node.role == "replica" and not health.fresh:
            state = f"lagging ({health.lag_bytes} bytes, {health.lag_seconds or 0.0:.1f}s)"
        states.append(f"{node.name}: {state or node.role or 'role unknown'}")
    return f"cluster {cluster.name} has no {wanted} available ({'; '.join(states)})"
