"""OpenTelemetry spans: one per unit of work, with where it went and why.

    RouterTracing(router)        # subscribes to router.events; a no-op without opentelemetry

Each unit of work gets a span `db.unit_of_work` carrying the node, role, cluster, intent,
tenant, routing reason, its retries and replays (as events) and whether it failed. The span
is the current one while the unit of work runs, so spans of its statements (from an
instrumentation of the driver, or your own) are its children. Because it follows the
router's events rather than instrumenting engines, tenant engines created at run time are
traced like the others (the problem of opentelemetry-python-contrib#3977 does not arise).
"""

from __future__ import annotations

from typing import Any

from pg_session_router.db.events import RouterObserver
from pg_session_router.db.router import SessionRouter
from pg_session_router.db.routing import Route
from pg_session_router.db.targets import Target

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
except ImportError:  # the `tracing` extra is optional
    trace = None  # type: ignore[assignment]

SPAN_NAME = "db.unit_of_work"
_SPAN_KEY = "pg_session_router.span"
_CONTEXT_KEY = "pg_session_router.span_context"


class RouterTracing(RouterObserver):
    def __init__(self, router: SessionRouter, tracer_provider: Any = None) -> None:
        self.router = router
        self.enabled = trace is not None
        if self.enabled:
            self._tracer = trace.get_tracer("pg_session_router", tracer_provider=tracer_provider)
            router.events.subscribe(self)

    def close(self) -> None:
        if self.enabled:
            self.router.events.unsubscribe(self)

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        span = self._tracer.start_span(SPAN_NAME, attributes=_attributes(route, target))
        info[_SPAN_KEY] = span
        info[_CONTEXT_KEY] = otel_context.attach(trace.set_span_in_context(span))

    def session_ended(
        self, info: dict[str, Any], route: Route, error: BaseException | None
    ) -> None:
        span = info.pop(_SPAN_KEY, None)
        token = info.pop(_CONTEXT_KEY, None)
        if span is None:
            return
        span.set_attribute("db.router.node", route.node.name)  # a replay may have moved it
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()
        # Detach only where it was attached: a framework may end the unit of work in a copy
        # of the context (the copy, and what was attached in it, is discarded anyway).
        if token is not None and trace.get_current_span() is span:
            otel_context.detach(token)

    def retried(self, kind: str, error: BaseException) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("db.router.retry", {"kind": kind, "error": type(error).__name__})


def _attributes(route: Route, target: Target) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "db.system": "postgresql",
        "db.router.node": route.node.name,
        "db.router.role": route.node.role or "unknown",
        "db.router.cluster": route.cluster.name,
        "db.router.intent": "read" if route.read_only else "write",
        "db.router.reason": route.reason,
    }
    if route.placement is not None:
        attributes["db.router.tenant"] = route.placement.tenant_id
    if target.after is not None:
        attributes["db.router.consistency_lsn"] = str(target.after)
    return attributes
