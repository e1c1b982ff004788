"""`router.status()`: what the router knows, as plain data for `/health/db` and operators.

Per node: current and configured role, `up` or `ejected` (since when, why), lag, probes, pool
use. Plus the tenancy figures. No URLs: node names only, so the result may be shown to
clients without giving the topology away.
"""

from __future__ import annotations

from typing import Any

from pg_session_router.core.settings import DatabaseSettings
from pg_session_router.db.admission import TenantAdmission
from pg_session_router.db.health import HealthMonitor
from pg_session_router.db.topology import Topology


def router_status(
    settings: DatabaseSettings,
    topology: Topology,
    admission: TenantAdmission,
    monitor: HealthMonitor,
    catalog_push: bool | None = None,
) -> dict[str, Any]:
    nodes = {
        name: {
            "role": node.role,
            "configured_role": node.configured_role,
            "weight": node.weight,
            **node.health.snapshot(),
            "pool": node.pool_status(),
        }
        for name, node in sorted(topology.nodes.items())
    }
    catalog = admission.registry.catalog
    return {
        "default_cluster": topology.default.name,
        "monitor_running": monitor.running,
        "health_interval": settings.health.interval,
        "nodes": nodes,
        "tenancy": {
            "tenants": len(admission.registry),
            "tenant_clusters": len(admission.engines),
            "tenant_engines": admission.engines.engines,
            "max_engines": admission.engines.max_engines,
            "evictions": admission.engines.evictions,
            "connections_in_use": sum(node["pool"]["in_use"] for node in nodes.values()),
            "max_connections": settings.max_connections,
            "catalog_loads": catalog.loads if catalog is not None else None,
            # Subscribed to pushed catalog changes now (None: no catalog or not started).
            "catalog_push": catalog_push,
            # Tenants known here with a move under way: id -> "copying", "paused" or "moved".
            "moving": {p.tenant_id: p.moving for p in admission.registry if p.moving},
        },
        "clusters": {
            name: sorted(node.name for node in cluster.nodes)
            for name, cluster in sorted(topology.clusters.items())
            if cluster.key.is_configured
        },
    }
