"""What the router tells observers: sessions routed and ended, retries and replays, servers
ejected and re-admitted.

Metrics and tracing (`pg_session_router.observability`) subscribe to a router's `events`;
the router core imports neither prometheus-client nor OpenTelemetry. With no observer, the
per-session events are not sent at all (`Observers.active`, read by the unit of work).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: health.py, below routing, reports events too
    from pg_session_router.db.routing import Route
    from pg_session_router.db.targets import Target

logger = logging.getLogger(__name__)


class RouterObserver:
    """Override what you need; every method is a no-op here. Methods run on the hot path
    (inside the event loop, some inside SQLAlchemy's greenlet): no I/O, no blocking.

    `info` is the session's `info` dict, where an observer may keep per-session state (a
    span) between `session_opened` and `session_ended`."""

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        """A unit of work was bound to `route.node`, for `route.reason`."""

    def session_ended(
        self, info: dict[str, Any], route: Route, error: BaseException | None
    ) -> None:
        """The unit of work ended: committed or read (`error` None), or failed."""

    def open_failed(self, target: Target, error: BaseException) -> None:
        """No session could be opened for `target` (no node, the deadline passed, ...)."""

    def retried(self, kind: str, error: BaseException) -> None:
        """`kind` ("open", "replay", "run") is tried again after `error`."""

    def server_ejected(self, endpoint: str, reason: str) -> None:
        """The circuit of a server opened (`endpoint` is host:port: keep it out of
        anything a client sees)."""

    def server_admitted(self, endpoint: str) -> None:
        """The circuit closed again after a successful probe."""

    def probe_round(self) -> None:
        """The monitor finished a round of probes (lag and states are fresh)."""


class Observers(RouterObserver):
    """The observers of one router: each event goes to every one, in subscription order.

    An observer that raises is logged (once per observer and event) and skipped: a metrics or
    tracing bug must never fail, leak or replay a unit of work, a retry or a probe round."""

    def __init__(self) -> None:
        self._observers: list[RouterObserver] = []
        self._reported: set[tuple[int, str]] = set()
        #: Someone listens: the unit of work sends its per-session events only then.
        self.active = False

    def subscribe(self, observer: RouterObserver) -> None:
        self._observers.append(observer)
        self.active = True

    def unsubscribe(self, observer: RouterObserver) -> None:
        self._observers.remove(observer)
        self.active = bool(self._observers)

    def _dispatch(self, event: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                key = (id(observer), event)
                if key not in self._reported:
                    self._reported.add(key)
                    logger.exception("router observer %r failed on %s", observer, event)

    def session_opened(self, info: dict[str, Any], route: Route, target: Target) -> None:
        self._dispatch("session_opened", info, route, target)

    def session_ended(
        self, info: dict[str, Any], route: Route, error: BaseException | None
    ) -> None:
        self._dispatch("session_ended", info, route, error)

    def open_failed(self, target: Target, error: BaseException) -> None:
        self._dispatch("open_failed", target, error)

    def retried(self, kind: str, error: BaseException) -> None:
        self._dispatch("retried", kind, error)

    def server_ejected(self, endpoint: str, reason: str) -> None:
        self._dispatch("server_ejected", endpoint, reason)

    def server_admitted(self, endpoint: str) -> None:
        self._dispatch("server_admitted", endpoint)

    def probe_round(self) -> None:
        self._dispatch("probe_round")
