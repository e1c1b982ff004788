"""Replica choice policies: which of the eligible replicas serves the next read.

Each policy is a small object with one method, `choose(candidates)`, called with the replicas
that are up and fresh enough (never empty). One policy instance per cluster.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pg_session_router.db.cluster import Node


class ReplicaPolicy(Protocol):
    def choose(self, candidates: Sequence[Node]) -> Node: ...


class RoundRobin:
    """Each eligible replica in turn, from a random one: processes (and routers built per
    test) started together do not all send their first reads to the same replica."""

    def __init__(self) -> None:
        self._counter = itertools.count(random.randrange(1 << 16))  # noqa: S311 - not security

    def choose(self, candidates: Sequence[Node]) -> Node:
        return candidates[next(self._counter) % len(candidates)]


class LeastInUse:
    """The replica whose pool has the fewest connections checked out (ties: round-robin)."""

    def __init__(self) -> None:
        self._tie_break = RoundRobin()

    def choose(self, candidates: Sequence[Node]) -> Node:
        fewest = min(node.in_use() for node in candidates)
        return self._tie_break.choose([node for node in candidates if node.in_use() == fewest])


class Weighted:
    """Smooth weighted round-robin (as in nginx): weights 3 and 1 give exactly 3 reads to 1,
    interleaved, and the split adapts at once when a replica leaves or rejoins."""

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def choose(self, candidates: Sequence[Node]) -> Node:
        total = 0
        best: Node | None = None
        for node in candidates:
            score = self._current.get(node.name, 0) + node.weight
            self._current[node.name] = score
            total += node.weight
            if best is None or score > self._current[best.name]:
                best = node
        assert best is not None
        self._current[best.name] -= total
        return best


POLICIES: dict[str, type[RoundRobin] | type[LeastInUse] | type[Weighted]] = {
    "round_robin": RoundRobin,
    "least_in_use": LeastInUse,
    "weighted": Weighted,
}
