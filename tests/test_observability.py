"""Seeing why every session went where it went: metrics, spans, request-scoped logs and the
route header, against the real cluster."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app.main import create_app
from pg_session_router.core.settings import HttpSettings, RouterSettings
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.devcluster import DevCluster, free_port
from pg_session_router.observability.logs import ContextFilter
from pg_session_router.observability.tracing import SPAN_NAME, RouterTracing
from pg_session_router.testing import paused_replay
from tests.conftest import APP_ROLE, database_settings
from tests.support.faults import eventually

HEALTH_TOKEN = "t" * 40
ROOT = Path(__file__).resolve().parent.parent


def observed_app(pg: DevCluster, **http: Any) -> FastAPI:
    settings = RouterSettings(
        database=database_settings(
            pg, routing={"max_replica_lag_bytes": 1024, "max_replica_lag_seconds": None}
        ),
        http=HttpSettings(metrics=True, health_token=HEALTH_TOKEN, **http),
    )
    return create_app(provider=RouterProvider(settings))


@pytest.fixture
async def served(migrated: DevCluster) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = observed_app(migrated, route_header=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield app, client


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {HEALTH_TOKEN}"})
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@pytest.mark.usefixtures("restore_cluster")
async def test_metrics_follow_traffic_fallbacks_and_ejections(
    served: tuple[FastAPI, httpx.AsyncClient], migrated: DevCluster
) -> None:
    _, client = served
    tenant = {"X-Tenant-ID": "globex"}
    assert (await client.get("/metrics")).status_code == 401  # names nodes: not for everyone
    assert (await client.get("/status")).status_code == 404  # off unless http.status_page
    router: SessionRouter = served[0].state.pg_session_router.router
    migrated.wait_replayed()  # no lag left by earlier tests: these reads go to replicas
    await router.monitor.probe_round()
    before = await scrape(client)
    for _ in range(5):
        assert (await client.get("/items", headers=tenant)).status_code == 200
    assert (
        await client.post("/items", json={"name": "metered"}, headers=tenant)
    ).status_code == 201
    after = await scrape(client)
    reads = "pgrouter_sessions_total"
    on_replicas = total(after, reads, intent="read", reason="replica") - total(
        before, reads, intent="read", reason="replica"
    )
    assert on_replicas == 5
    assert total(after, reads, intent="write", reason="write") >= 1
    assert not any("tenant" in dict(labels) for (_, labels) in after)  # bounded cardinality
    assert total(after, "pgrouter_pool_size", node="main.primary") > 0
    assert total(after, "pgrouter_pool_checkouts_total", node="main.primary") >= 1
    assert total(after, "pgrouter_pool_checkout_wait_seconds_total", node="main.primary") > 0

    with paused_replay(migrated):
        for n in range(20):  # past the 1 KB lag limit
            await client.post("/items", json={"name": f"lagging-{n}" * 10}, headers=tenant)
        await eventually(
            lambda: not any(r.health.fresh for r in router.default_cluster.replicas),
            within=10,
            what="the replicas to fall behind",
        )
        assert (await client.get("/items", headers=tenant)).status_code == 200
        lagging = await scrape(client)
        assert total(lagging, reads, reason="fallback-lag") >= 1
        assert total(lagging, "pgrouter_replica_replay_paused", node="main.replica1") == 1

    migrated.stop_node("replica2")
    await eventually(
        lambda: not router.node("main.replica2").health.up, within=10, what="an ejection"
    )
    ejected = await scrape(client)
    assert total(ejected, "pgrouter_ejections_total") >= 1
    assert total(ejected, "pgrouter_node_up", node="main.replica2") == 0


async def test_route_header_and_request_id_reach_the_client(
    served: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _, client = served
    response = await client.get("/items", headers={"X-Tenant-ID": "acme", "X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    node, reason = response.headers["x-db-route"].split("; reason=")
    assert node.startswith("main@acme.") and reason in ("replica", "fallback-lag")
    for forged_id in ("a\tb", "a b", "x" * 65, "a<b>", "a;rm", 'a"b'):
        forged = await client.get(
            "/items", headers={"X-Tenant-ID": "acme", "X-Request-ID": forged_id}
        )
        assert forged.headers["x-request-id"] not in (forged_id, "")  # replaced, not echoed


async def test_no_route_header_unless_asked_for(migrated: DevCluster) -> None:
    app = observed_app(migrated)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/items", headers={"X-Tenant-ID": "acme"})
    assert response.status_code == 200 and "x-db-route" not in response.headers


async def test_log_records_of_a_request_carry_its_id_tenant_and_node(
    served: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = served
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(ContextFilter())
    route_logger = logging.getLogger("tests.observability.route")
    route_logger.addHandler(handler)
    route_logger.setLevel(logging.INFO)

    @app.get("/logged")
    async def logged() -> dict[str, str]:
        router: SessionRouter = app.state.pg_session_router.router
        async with router.session(tenant="globex", read_only=True) as session:
            await session.execute(text("SELECT 1"))
        route_logger.info("served")
        return {}

    try:
        await client.get("/logged", headers={"X-Request-ID": "abc.123"})
    finally:
        route_logger.removeHandler(handler)
    (record,) = records
    assert (record.request_id, record.tenant) == ("abc.123", "globex")  # type: ignore[attr-defined]
    assert record.node.startswith("main.")  # type: ignore[attr-defined]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "outside", None, None)
    ContextFilter().filter(outside)
    assert outside.request_id == "-"  # type: ignore[attr-defined]


async def test_spans_carry_node_and_reason_also_for_a_tenant_engine_built_later(
    router: SessionRouter,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = RouterTracing(router, tracer_provider=provider)
    tracer = provider.get_tracer("tests")
    try:
        # The tenant's engines are built after the observer subscribed: still traced.
        await router.close_tenant_cluster(router.tenants.placement("acme").cluster_key)
        async with router.session(tenant="acme", read_only=True) as session:
            with tracer.start_as_current_span("statement"):
                await session.execute(text("SELECT 1"))
        async with router.session() as session:
            await session.execute(text("SELECT 1"))
    finally:
        tracing.close()
    spans = {span.name: span for span in exporter.get_finished_spans() if span.name != SPAN_NAME}
    units = [span for span in exporter.get_finished_spans() if span.name == SPAN_NAME]
    assert len(units) == 2
    read, write = units
    assert read.attributes["db.router.tenant"] == "acme"
    assert str(read.attributes["db.router.node"]).startswith("main@acme.")
    assert read.attributes["db.router.reason"] in ("replica", "fallback-lag")
    assert write.attributes["db.router.reason"] == "write"
    assert spans["statement"].parent is not None
    assert spans["statement"].parent.span_id == read.context.span_id  # a child of the unit


def test_every_metric_the_dashboard_plots_exists(served_metrics_names: set[str]) -> None:
    dashboard = json.loads((ROOT / "dashboards" / "pg-session-router.json").read_text())
    plotted = {
        name.removesuffix("_total")
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"pgrouter_[a-z_]+", target["expr"])
    }
    assert plotted and plotted <= served_metrics_names, plotted - served_metrics_names


@pytest.fixture
async def served_metrics_names(served: tuple[FastAPI, httpx.AsyncClient]) -> set[str]:
    _, client = served
    await client.get("/items", headers={"X-Tenant-ID": "globex"})
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {HEALTH_TOKEN}"})
    return {family.name for family in text_string_to_metric_families(response.text)}


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed by the test run itself when missing (as root, like the
    PostgreSQL binaries the cluster fixtures need)."""
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("chromium")
    assert found is not None
    return found


@pytest.mark.usefixtures("restore_cluster")
def test_the_status_page_in_a_browser_shows_every_node_and_a_stopped_replica_down(
    migrated: DevCluster, tmp_path: Path, chromium: str
) -> None:
    replicas = ", ".join(
        f'"{migrated.url(node.name, database="app", user=APP_ROLE)}"' for node in migrated.replicas
    )
    config = tmp_path / "status.toml"
    config.write_text(
        "[database.health]\ninterval = 0.25\n"
        "[database.clusters.main]\n"
        f'primary = "{migrated.url(database="app", user=APP_ROLE)}"\nreplicas = [{replicas}]\n'
        "[http]\nstatus_page = true\nhealth_details_public = true\n"
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        env={**os.environ, "APP_CONFIG_FILE": str(config)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{base}/health/db"), "the server to answer")
        migrated.stop_node("replica2")
        wait_for(lambda: _replica2_down(base), "replica2 to be ejected")
        page = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--dump-dom",
                f"{base}/status",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = {row.split("</td>")[0].split(">")[-1]: row for row in page.split("<tr>")[1:]}
    assert {"main.primary", "main.replica1", "main.replica2"} <= set(rows), page[:2000]
    assert "DOWN" in rows["main.replica2"] and "DOWN" not in rows["main.replica1"]
    assert "127.0.0.1" not in page  # no server addresses


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.TransportError:
        return False


def _replica2_down(base: str) -> bool:
    nodes = httpx.get(f"{base}/health/db", timeout=2).json().get("nodes", {})
    return nodes.get("main.replica2", {}).get("state") == "ejected"


def wait_for(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
