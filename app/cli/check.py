"""`python -m app check` probes every configured node; `python -m app config` prints the
effective configuration (no secrets).

`check` runs one round of the router's own health probe against every server of every
configured cluster and prints a table: role found against role configured, up or down (and
why), replay lag, server version, pool settings. Exit 0 when every node is up and every
configured primary is a primary, 1 otherwise (naming them), 2 for a bad configuration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.table import Table
from rich.text import Text

from app.cli.common import EXIT_FAILED, EXIT_OK, console
from app.core.config import load_settings
from pg_session_router.core.settings import RouterSettings
from pg_session_router.db import moves
from pg_session_router.db.router import SessionRouter


def run_config() -> int:
    print(load_settings().model_dump_json(indent=2, by_alias=True))
    return EXIT_OK


def run_check() -> int:
    settings = load_settings()
    nodes, moving = asyncio.run(_probe(settings))
    out = console()
    out.print(_table(nodes, settings))
    if moving:
        out.print(_moves_table(moving))
    problems = [f"{name}: {problem}" for name, node in nodes.items() if (problem := _problem(node))]
    if problems:
        console(stderr=True).print("; ".join(problems), markup=False, highlight=False)
        return EXIT_FAILED
    out.print(f"{len(nodes)} nodes, all up")
    return EXIT_OK


async def _probe(
    settings: RouterSettings,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every node's state, and the tenant moves recorded in the catalog (none if the catalog
    cannot be read: the node table says why)."""
    router = SessionRouter.from_settings(settings)
    try:
        await router.monitor.probe_round()
        try:
            moving = await moves.moves_under_way(router)
        except Exception:
            moving = {}
        return dict(router.status()["nodes"]), moving
    finally:
        await router.dispose()


def _moves_table(moving: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="tenants in motion")
    for column in ("tenant", "from", "to", "state", "since", "write pause"):
        table.add_column(column)
    for tenant_id, move in sorted(moving.items()):
        pause = move["write_pause_ms"]
        table.add_row(
            tenant_id,
            move["source_cluster"],
            move["target_cluster"],
            move["state"] + (" (old storage kept: drop-moved)" if move["state"] == "moved" else ""),
            f"{move['started_at']:%Y-%m-%d %H:%M:%S}",
            "-" if pause is None else f"{pause} ms",
        )
    return table


def _problem(node: dict[str, Any]) -> str | None:
    if node["state"] != "up":
        return f"down ({node['reason']})"
    if node["configured_role"] == "primary" and node["in_recovery"]:
        return "configured as primary but is a standby (in recovery)"
    if node["configured_role"] == "replica" and node["in_recovery"] is False:
        return "configured as replica but is a primary (promoted? two primaries?)"
    return None


def _table(nodes: dict[str, dict[str, Any]], settings: RouterSettings) -> Table:
    table = Table(title="nodes")
    for column in ("node", "role", "state", "lag", "version", "pool"):
        table.add_column(column, no_wrap=column != "state")
    for name, node in nodes.items():
        cells = [
            name,
            _role(node),
            "up" if node["state"] == "up" else f"DOWN: {node['reason']}",
            _lag(node),
            node.get("server_version") or "-",
            _pool(name, settings),
        ]
        table.add_row(*(Text(cell) for cell in cells))  # a server's words are not markup
    return table


def _role(node: dict[str, Any]) -> str:
    found = {True: "replica", False: "primary", None: "?"}[node["in_recovery"]]
    configured = node["configured_role"]
    if configured and configured != found and node["in_recovery"] is not None:
        return f"{found} (configured {configured})"
    return found


def _lag(node: dict[str, Any]) -> str:
    if not node["in_recovery"]:
        return "-"
    seconds, size = node["lag_seconds"], node["lag_bytes"]
    paused = ", replay paused" if node["replay_paused"] else ""
    shown_seconds = f"{seconds:.1f} s" if seconds is not None else "? s"
    shown_bytes = f"{size} B" if size is not None else "? B"
    return f"{shown_seconds} / {shown_bytes}{paused}"


def _pool(name: str, settings: RouterSettings) -> str:
    cluster = settings.database.clusters.get(name.split(".")[0])
    if cluster is None:
        return "-"
    pool = cluster.pool
    return f"{pool.size}+{pool.max_overflow}, timeout {pool.timeout:g} s"
