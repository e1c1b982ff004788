"""What the `/status` page shows over time: replica lag per node for the last minutes, and
how many sessions went where for which reason. Kept in memory, bounded, per router."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from pg_session_router.db.events import RouterObserver
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.routing import Route
from pg_session_router.db.targets import Target

#: Lag samples kept: one per probe round (a second by default), five minutes of them.
SAMPLES = 300


class StatusHistory(RouterObserver):
    def __init__(self, router: SessionRouter, samples: int = SAMPLES) -> None:
        self.router = router
        #: (unix time, {node: lag seconds}) per probe round, oldest first.
        self.lag: deque[tuple[float, dict[str, float]]] = deque(maxlen=samples)
        #: Read sessions by routing reason since start.
        self.reads_by_reason: Counter[str] = Counter()
        router.events.subscribe(self)

    def close(self) -> None:
        self.router.events.unsubscribe(self)

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        if route.read_only:
            self.reads_by_reason[route.reason] += 1

    def probe_round(self) -> None:
        lags = {
            node.name: node.health.lag_seconds or 0.0
            for cluster in self.router.clusters.values()
            if cluster.key.is_configured
            for node in cluster.nodes
            if node.role == "replica"
        }
        self.lag.append((time.time(), lags))
