"""Request-scoped log records: the request id, tenant and node on every record emitted while
a request is served, and a JSON format for log pipelines.

    configure_logging(json_format=True)   # or add ContextFilter() to your own handlers

The middleware opens a context per request (`request_context`) holding its request id (the
client's `X-Request-ID` when it is a plain token, else a new one); the tenant and the node
are added when a unit of work opens (`NodeLogger`). Records outside a request carry "-".
The router logs one line per state change (an ejection, a re-admission), never per request.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pg_session_router.db.events import RouterObserver
from pg_session_router.db.routing import Route
from pg_session_router.db.targets import Target

FIELDS = ("request_id", "tenant", "node")
# A context variable, not state: each request (task) sees its own dict.
_CONTEXT: ContextVar[dict[str, str] | None] = ContextVar("pg_session_router_log", default=None)
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_from(presented: str | None) -> str:
    """The client's id when it is a plain token (nothing to forge log lines with), else a
    new one."""
    if presented is not None and _PLAIN_ID.fullmatch(presented):
        return presented
    # 128 random bits in hex, like uuid4().hex without building a UUID on every request.
    return os.urandom(16).hex()


@contextmanager
def request_context(request_id: str) -> Iterator[dict[str, str]]:
    fields = {"request_id": request_id}
    token = _CONTEXT.set(fields)
    try:
        yield fields
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Puts `request_id`, `tenant` and `node` on every record ("-" when unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _CONTEXT.get() or {}
        for name in FIELDS:
            setattr(record, name, context.get(name, "-"))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields, and the
    exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            entry[name] = getattr(record, name, "-")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


TEXT_FORMAT = "%(levelname)s %(name)s [%(request_id)s %(tenant)s %(node)s] %(message)s"


def configure_logging(*, json_format: bool = False, level: int = logging.INFO) -> None:
    """A stderr handler with the context filter, as text or JSON, on the root logger."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


class NodeLogger(RouterObserver):
    """Binds the node (and the tenant, once the registry has validated its id) of each unit
    of work opened while a request is served."""

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        context = _CONTEXT.get()
        if context is not None:
            context["node"] = route.node.name
            if route.placement is not None:
                context["tenant"] = route.placement.tenant_id
