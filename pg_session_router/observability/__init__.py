"""Seeing what the router does: Prometheus metrics, OpenTelemetry spans, request-scoped logs.

Each piece is an observer of a router's `events` (`pg_session_router.db.events`) or a logging
helper; none is needed to route. Extras: `metrics` (prometheus-client), `tracing`
(opentelemetry-api; without it tracing is a no-op).
"""
