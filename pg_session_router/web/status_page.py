"""`GET /status`: the router's state as a page an operator reads at a glance.

Server-rendered HTML, no script and no build step (it refreshes itself every 5 s): each
node's role and state, replica lag over the last minutes as a small chart, pool use, the
share of reads by reason, tenants and tenant engines. Shown to the same requests as the
health details (`http.health_token`, or `http.health_details_public`); 404 unless
`http.status_page`. Every value is escaped; server addresses are never shown.
"""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi import Request, Response
from fastapi.responses import HTMLResponse

from pg_session_router.observability.history import StatusHistory
from pg_session_router.web.health import operators_only, overall_status, public_status
from pg_session_router.web.installation import installation_of

_STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px}
th{background:#f3f3f3}.down{color:#b00;font-weight:bold}.up{color:#070}
svg{background:#fafafa;border:1px solid #ddd}"""


async def status_page(request: Request) -> Response:
    installation = installation_of(request)
    history = installation.history
    refusal = operators_only(request, enabled=history is not None)
    if refusal is not None:
        return refusal
    assert history is not None  # enabled
    router = installation.router
    status = public_status(router)
    body = (
        f"<h1>Session router: {escape(overall_status(router))}</h1>"
        + _nodes(status["nodes"], history)
        + _reads(history)
        + _tenancy(status["tenancy"])
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="5"><title>session router status</title>'
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(page)


def _nodes(nodes: dict[str, dict[str, Any]], history: StatusHistory) -> str:
    rows = []
    for name, node in nodes.items():
        up = node["state"] == "up"
        state = "up" if up else f"DOWN ({node.get('reason') or 'ejected'})"
        role = node["role"] or "unknown"
        lag = (
            f"{node['lag_seconds'] or 0.0:.1f} s / {node['lag_bytes'] or 0} B"
            if role == "replica"
            else "-"
        )
        if node.get("replay_paused"):
            lag += ", replay paused"
        pool = f"{node['pool']['in_use']} / {node['pool']['size']}"
        rows.append(
            f"<tr><td>{escape(name)}</td><td>{escape(role)}</td>"
            f'<td class="{"up" if up else "down"}">{escape(state)}</td>'
            f"<td>{escape(lag)}</td><td>{_sparkline(history, name)}</td>"
            f"<td>{escape(pool)}</td></tr>"
        )
    columns = ("node", "role", "state", "lag", "lag, last minutes", "pool in use")
    head = "<tr>" + "".join(f"<th>{column}</th>" for column in columns) + "</tr>"
    return f"<h2>Nodes</h2><table>{head}{''.join(rows)}</table>"


def _sparkline(history: StatusHistory, node: str, width: int = 240, height: int = 40) -> str:
    values = [lags[node] for _, lags in history.lag if node in lags]
    if len(values) < 2:
        return "-"
    top = max(max(values), 1.0)
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - value / top * (height - 2):.1f}"
        for i, value in enumerate(values)
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="lag of {escape(node)}">'
        f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{points}"/></svg>'
        f" max {top:.1f} s"
    )


def _reads(history: StatusHistory) -> str:
    total = sum(history.reads_by_reason.values())
    if not total:
        return "<h2>Reads by reason</h2><p>no reads yet</p>"
    rows = "".join(
        f"<tr><td>{escape(reason)}</td><td>{count}</td><td>{count / total:.1%}</td></tr>"
        for reason, count in history.reads_by_reason.most_common()
    )
    head = "<tr><th>reason</th><th>reads</th><th>share</th></tr>"
    return f"<h2>Reads by reason</h2><table>{head}{rows}</table>"


def _tenancy(tenancy: dict[str, Any]) -> str:
    cells = {
        "tenants known": tenancy["tenants"],
        "tenant clusters open": tenancy["tenant_clusters"],
        "tenant engines open": f"{tenancy['tenant_engines']} / {tenancy['max_engines']}",
        "connections in use": tenancy["connections_in_use"],
    }
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in cells.items()
    )
    return f"<h2>Tenants</h2><table>{rows}</table>"
