"""`RouterInstallation`: what `install_router` put on one FastAPI app.

It holds the app's `RouterProvider` and the HTTP wiring read from `http.*` settings (the tenant
resolver, whether writes carry consistency tokens). The middleware puts it in every request's
scope, where the session dependencies find it: also in apps mounted under the one it was
installed on, and without module globals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from pg_session_router.core.errors import ConfigError, RouterNotInstalledError
from pg_session_router.core.settings import HttpSettings
from pg_session_router.db.consistency import LastWrites
from pg_session_router.db.last_writes import SharedLastWrites
from pg_session_router.db.provider import RouterProvider
from pg_session_router.db.router import SessionRouter
from pg_session_router.observability.history import StatusHistory
from pg_session_router.observability.logs import NodeLogger
from pg_session_router.web.resolvers import TenantResolver, build_tenant_resolver

if TYPE_CHECKING:  # the metrics extra is optional
    from pg_session_router.observability.metrics import RouterMetrics
    from pg_session_router.observability.tracing import RouterTracing

#: The key of the installation in `scope["state"]` (what `request.state` reads).
STATE_KEY = "pg_session_router"


class RouterInstallation:
    def __init__(self, provider: RouterProvider, resolver: TenantResolver | None = None) -> None:
        self.provider = provider
        self._custom_resolver = resolver
        self._resolver: TenantResolver | None = None
        self._http: HttpSettings | None = None
        #: The router's Prometheus metrics, when `http.metrics` is on (built at startup).
        self.metrics: RouterMetrics | None = None
        self.tracing: RouterTracing | None = None
        #: What `/status` shows over time, when `http.status_page` is on.
        self.history: StatusHistory | None = None
        self._node_logger = NodeLogger()
        #: Each tenant's last commit position, when `http.consistency_memory` is not "off":
        #: in this process ("tenant") or in the router's table ("shared").
        self.memory: LastWrites | SharedLastWrites | None = None

    def configure(self, http: HttpSettings | None = None) -> None:
        """Build the HTTP wiring from `http`, by default the provider's settings (read now:
        a bad configuration raises here)."""
        if http is None:
            http = self.provider.settings.http
        self._resolver = self._custom_resolver or build_tenant_resolver(http)
        self._http = http
        self.memory = _memory(http, lambda: self.router)

    @property
    def http(self) -> HttpSettings:
        if self._http is None:
            self.configure()
        assert self._http is not None
        return self._http

    @property
    def tenant_resolver(self) -> TenantResolver:
        if self._resolver is None:  # no lifespan ran (some test clients): configure now
            self.configure()
        assert self._resolver is not None
        return self._resolver

    @property
    def router(self) -> SessionRouter:
        return self.provider.get()

    async def start(self) -> None:
        """At startup: settings checked, wiring built, observers subscribed, every server
        probed once."""
        self.configure()
        router = self.provider.get()
        router.events.subscribe(self._node_logger)
        if self.http.metrics:
            self.metrics = _build_metrics(router, self.http)
        if self.http.status_page:
            self.history = StatusHistory(router)
        if self.http.tracing:
            from pg_session_router.observability.tracing import RouterTracing

            self.tracing = RouterTracing(router)
        await router.start()

    async def stop(self) -> None:
        for observer in (self.metrics, self.tracing, self.history):
            if observer is not None:
                observer.close()
        self.metrics, self.tracing, self.history = None, None, None
        router = self.provider.current
        if router is not None:
            router.events.unsubscribe(self._node_logger)
        await self.provider.dispose()


def _memory(
    http: HttpSettings, router: Callable[[], SessionRouter]
) -> LastWrites | SharedLastWrites | None:
    if http.consistency_memory == "tenant":
        return LastWrites()
    if http.consistency_memory == "shared":
        return SharedLastWrites(router)
    return None


def _build_metrics(router: SessionRouter, http: HttpSettings) -> RouterMetrics:
    try:
        from pg_session_router.observability.metrics import RouterMetrics
    except ImportError:
        raise ConfigError(
            "http.metrics: prometheus-client is not installed (pip install "
            "'pg-session-router[metrics]')"
        ) from None
    return RouterMetrics(router, tenant_label=http.metrics_tenant_label)


def installation_of(connection: HTTPConnection) -> RouterInstallation:
    """The installation serving this request, or a `RouterNotInstalledError` saying what to do."""
    installation = connection.scope.get("state", {}).get(STATE_KEY)
    if not isinstance(installation, RouterInstallation):
        raise RouterNotInstalledError(
            "no session router on this app: call pg_session_router.web.install_router(app) at "
            "startup (it adds the lifespan, middleware and error handlers that get_db needs)"
        )
    return installation
