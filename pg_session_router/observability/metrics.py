"""Prometheus metrics of one router: why sessions went where they went, and the state of the
nodes behind them.

    metrics = RouterMetrics(router)          # subscribes to router.events
    body, content_type = metrics.exposition()

Counters move with traffic (sessions by cluster, intent, role and reason; retries and replays
by SQLSTATE class; ejections and re-admissions; consistency-token reads by how they were
served). Gauges (pool use, replica lag, replay paused, tenant engines) are refreshed after
every probe round and before every exposition. Each router has its own registry: two routers
in one process (or one per test) never share counters.

Cardinality stays bounded: no tenant id as a label unless `tenant_label=True` (for
deployments with few tenants); tenant database clusters are labelled by the configured
cluster that holds them. Under several worker processes (`serve --workers`), set
`PROMETHEUS_MULTIPROC_DIR` and each process writes its values there; `exposition()` then
aggregates every process (gauges: sum of live processes for pools, max for lag).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from sqlalchemy.exc import DBAPIError

from pg_session_router.core.errors import RouterError
from pg_session_router.db.driver_errors import is_connect_failure, sqlstate
from pg_session_router.db.events import RouterObserver
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.routing import Route
from pg_session_router.db.targets import Target

NAMESPACE = "pgrouter"
#: What counts as a failed unit of work: the database's or the router's errors, bounded.
_DATABASE_ERRORS = (RouterError, DBAPIError)


def cluster_label(route: Route) -> str:
    """The configured cluster ("main"), also for a tenant's database on it; "own-server" for
    a tenant on a server of its own: never a tenant id."""
    return route.cluster.key.cluster or "own-server"


def error_class(error: BaseException) -> str:
    """SQLSTATE class ("08", "57", ...), else "connect" or "other": a bounded label."""
    state = sqlstate(error)
    if state:
        return state[:2]
    return "connect" if is_connect_failure(error) else "other"


class RouterMetrics(RouterObserver):
    def __init__(
        self,
        router: SessionRouter,
        *,
        registry: CollectorRegistry | None = None,
        tenant_label: bool = False,
    ) -> None:
        self.router = router
        self.registry = registry or CollectorRegistry()
        self.tenant_label = tenant_label
        self._build_counters()
        self._build_gauges()
        router.events.subscribe(self)

    def close(self) -> None:
        self.router.events.unsubscribe(self)
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            # This process's live gauges leave the sums (its counters stay counted).
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def _counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, labels, namespace=NAMESPACE, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: list[str], mode: str) -> Gauge:
        return Gauge(
            name,
            doc,
            labels,
            namespace=NAMESPACE,
            registry=self.registry,
            multiprocess_mode=mode,  # type: ignore[arg-type]
        )

    def _build_counters(self) -> None:
        session_labels = ["cluster", "intent", "role", "reason"]
        if self.tenant_label:
            session_labels.append("tenant")
        self.sessions = self._counter(
            "sessions", "Units of work by cluster, intent, chosen role and reason", session_labels
        )
        # The counter of each label set seen (None in the tenant slot without `tenant_label`):
        # as many as prometheus-client keeps itself.
        self._sessions_by_labels: dict[tuple[str | None, ...], Any] = {}
        self.session_errors = self._counter(
            "session_errors", "Units of work that failed, by error class", ["cluster", "error"]
        )
        self.retries = self._counter(
            "retries",
            "Retries (open, run) and statement replays by SQLSTATE class",
            ["kind", "error"],
        )
        # No server label: addresses are topology, and tenants' own servers are unbounded
        # (pgrouter_node_up tells which configured node is out).
        self.ejections = self._counter("ejections", "Servers ejected (circuit opened)", [])
        self.readmissions = self._counter("readmissions", "Servers re-admitted", [])
        self.token_reads = self._counter(
            "consistency_token_reads",
            "Reads carrying a consistency token, by how served",
            ["served_by"],
        )

    def _build_gauges(self) -> None:
        node = ["node", "role"]
        self.pool_in_use = self._gauge("pool_in_use", "Connections checked out", node, "livesum")
        self.pool_size = self._gauge("pool_size", "Pool size (steady connections)", node, "livesum")
        self.node_up = self._gauge(
            "node_up", "1 when the node's server is admitted", node, "livemin"
        )
        self.lag_seconds = self._gauge(
            "replica_lag_seconds", "Replay lag in seconds", ["node"], "livemax"
        )
        self.lag_bytes = self._gauge(
            "replica_lag_bytes", "Replay lag in bytes", ["node"], "livemax"
        )
        self.replay_paused = self._gauge(
            "replica_replay_paused", "1 when WAL replay is paused", ["node"], "livemax"
        )
        self.tenant_engines = self._gauge(
            "tenant_engines_open", "Tenant database engines open", [], "livesum"
        )
        self.tenant_clusters = self._gauge(
            "tenant_clusters_open", "Tenant database clusters in the engine cache", [], "livesum"
        )
        self.tenants_known = self._gauge(
            "tenants_known", "Tenants this process knows", [], "livemax"
        )
        self.connections_in_use = self._gauge(
            "connections_in_use", "Connections checked out, every pool", [], "livesum"
        )
        self.connection_budget = self._gauge(
            "connection_budget", "database.max_connections (absent: no cap)", [], "livesum"
        )
        self.evictions = self._counter(
            "tenant_cluster_evictions", "Tenant database clusters closed (LRU, removal)", []
        )
        self._evictions_seen = 0
        self.checkouts = self._counter("pool_checkouts", "Connections checked out", ["node"])
        self.checkout_wait = self._counter(
            "pool_checkout_wait_seconds",
            "Seconds checkouts waited for a free or a new connection (rate / checkouts rate:"
            " the mean wait)",
            ["node"],
        )
        self._pool_seen: dict[str, tuple[int, float]] = {}
        self._node_gauges = (
            self.pool_in_use,
            self.pool_size,
            self.node_up,
            self.lag_seconds,
            self.lag_bytes,
            self.replay_paused,
        )

    # -- events ----------------------------------------------------------------------------

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        labels = (
            cluster_label(route),
            "read" if route.read_only else "write",
            route.node.role or "unknown",
            route.reason,
            (route.placement.tenant_id if route.placement else "") if self.tenant_label else None,
        )
        counter = self._sessions_by_labels.get(labels)
        if counter is None:  # prometheus-client's labels() costs a lock and a tuple per call
            counter = self.sessions.labels(*(label for label in labels if label is not None))
            self._sessions_by_labels[labels] = counter
        counter.inc()
        if target.after is not None and route.read_only:
            served = "primary" if route.node.role != "replica" else "replica"
            if route.reason == "consistency-token-waited":
                served = "replica-after-wait"
            self.token_reads.labels(served).inc()

    def session_ended(
        self, info: dict[str, Any], route: Route, error: BaseException | None
    ) -> None:
        if isinstance(error, _DATABASE_ERRORS):  # not the caller's own (an HTTPException)
            self.session_errors.labels(cluster_label(route), type(error).__name__).inc()

    def open_failed(self, target: Target, error: BaseException) -> None:
        if isinstance(error, _DATABASE_ERRORS):
            self.session_errors.labels("-", type(error).__name__).inc()

    def retried(self, kind: str, error: BaseException) -> None:
        self.retries.labels(kind, error_class(error)).inc()

    def server_ejected(self, endpoint: str, reason: str) -> None:
        self.ejections.inc()

    def server_admitted(self, endpoint: str) -> None:
        self.readmissions.inc()

    def probe_round(self) -> None:
        self.refresh()

    # -- gauges and exposition -------------------------------------------------------------

    def refresh(self) -> None:
        """Gauges from `router.status()` (configured clusters' nodes only: bounded)."""
        status = self.router.status()
        for gauge in self._node_gauges:  # a node that changed role or left: no stale series
            gauge.clear()
        for name, node in status["nodes"].items():
            if "@" in name:
                continue  # a tenant database's node: counted in tenant_engines_open
            role = node["role"] or "unknown"
            self.pool_in_use.labels(name, role).set(node["pool"]["in_use"])
            self.pool_size.labels(name, role).set(node["pool"]["size"])
            self.node_up.labels(name, role).set(1 if node["state"] == "up" else 0)
            self._count_checkouts(name, node["pool"])
            if node["in_recovery"]:
                self.lag_seconds.labels(name).set(node["lag_seconds"] or 0.0)
                self.lag_bytes.labels(name).set(node["lag_bytes"] or 0)
                self.replay_paused.labels(name).set(1 if node["replay_paused"] else 0)
        tenancy = status["tenancy"]
        self.tenant_engines.set(tenancy["tenant_engines"])
        self.tenant_clusters.set(tenancy["tenant_clusters"])
        self.tenants_known.set(tenancy["tenants"])
        self.connections_in_use.set(tenancy["connections_in_use"])
        if tenancy["max_connections"] is not None:
            self.connection_budget.set(tenancy["max_connections"])
        if tenancy["evictions"] > self._evictions_seen:
            self.evictions.inc(tenancy["evictions"] - self._evictions_seen)
            self._evictions_seen = tenancy["evictions"]

    def _count_checkouts(self, name: str, pool: dict[str, Any]) -> None:
        """The pool's own totals as counters (they restart when a pool is recreated)."""
        checkouts, waited = pool["checkouts"], pool["checkout_wait_seconds"]
        seen_checkouts, seen_waited = self._pool_seen.get(name, (0, 0.0))
        if checkouts < seen_checkouts:  # a new pool: count it from zero
            seen_checkouts, seen_waited = 0, 0.0
        self.checkouts.labels(name).inc(checkouts - seen_checkouts)
        self.checkout_wait.labels(name).inc(max(0.0, waited - seen_waited))
        self._pool_seen[name] = (checkouts, waited)

    def exposition(self) -> tuple[bytes, str]:
        """The text format for a scrape, and its content type."""
        self.refresh()
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            aggregate = CollectorRegistry()
            multiprocess.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
            return generate_latest(aggregate), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
