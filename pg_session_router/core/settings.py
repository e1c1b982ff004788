"""Settings: what the router is told about clusters, pools and tenants.

`load_settings(config_file, env_prefix=...)` reads, highest priority first: keyword arguments,
the environment (`PGROUTER_` prefix by default, `__` between levels), `.env`, the TOML file
given (if any), defaults. A host application picks its own prefix and file, so the library
never reads a variable the host uses for something else. `RouterSettings(...)` built in code
works the same way without a file. These objects only describe;
`pg_session_router.db.router.SessionRouter` builds the runtime objects (engines, pools) from
them.

Database URLs are kept as SQLAlchemy `URL` objects, whose repr hides the password, and validation
errors are re-raised as `ConfigError` built from the error locations and messages only, so a bad
configuration never prints the secret it contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PlainSerializer,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from pg_session_router.core.names import (
    IDENTIFIER_RULE,
    TENANT_ID_RULE,
    database_problem,
    is_identifier,
    is_tenant_id,
    schema_problem,
)

#: The environment prefix the library reads when the host names none.
DEFAULT_ENV_PREFIX = "PGROUTER_"
DEFAULT_TENANT_HEADER = "X-Tenant-ID"
_ASYNC_DRIVER = "postgresql+asyncpg"


def _parse_database_url(value: object) -> URL:
    """Accept `postgresql://` or `postgresql+asyncpg://` URLs; always use the asyncpg driver."""
    if isinstance(value, URL):
        url = value
    elif isinstance(value, str):
        try:
            url = make_url(value)
        except ArgumentError:
            # The message of ArgumentError quotes the input, which may hold a password.
            raise ValueError("not a valid URL") from None
    else:
        raise ValueError("not a valid URL")
    if url.get_backend_name() != "postgresql":
        raise ValueError("not a PostgreSQL URL (expected postgresql+asyncpg://...)")
    if url.drivername not in ("postgresql", _ASYNC_DRIVER):
        # A bare `postgresql://` is accepted and means asyncpg here.
        raise ValueError("unsupported driver (expected postgresql+asyncpg://...)")
    if not url.host or not url.database:
        raise ValueError("a database URL needs a host and a database name")
    if any(key.lower() in _SECRET_QUERY_KEYS for key in url.query):
        # Only the password part is masked wherever a URL is shown; a query one would leak.
        raise ValueError("put the password in the URL's password part (user:password@host)")
    return url.set(drivername=_ASYNC_DRIVER)


_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


# `NoDecode`: URL is a NamedTuple, which pydantic-settings would otherwise try to JSON-decode
# when it comes from an environment variable.
DatabaseUrl = Annotated[
    URL,
    NoDecode,
    BeforeValidator(_parse_database_url),
    PlainSerializer(lambda url: url.render_as_string(hide_password=True), return_type=str),
]


def _off_is_none(value: object) -> object:
    """TOML has no null, and an environment variable is text: `"off"` says None there."""
    return None if isinstance(value, str) and value.strip().lower() == "off" else value


#: A limit or timer that may be turned off ("off" in the comments of its setting): None in
#: Python, `"off"` in TOML or the environment.
Off = BeforeValidator(_off_is_none)
#: From a second (the kernel counts keepalive in whole seconds) to a day.
DeadAfterSeconds = Annotated[float, Field(ge=1.0, le=86400.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class PoolSettings(_Section):
    """One connection pool; every node (primary, replica, tenant database) gets its own."""

    size: PositiveInt = 5
    max_overflow: NonNegativeInt = 5
    #: Seconds a session waits for a pooled connection before giving up.
    timeout: PositiveFloat = 10.0
    #: Seconds after which a pooled connection is replaced (-1: never).
    recycle: int = 1800
    #: Ping every connection on checkout (a round trip per session; off by default).
    pre_ping: bool = False
    #: Ping a pooled connection that has been idle this long (seconds) before handing it out,
    #: within `connect_timeout`: a connection cut without a FIN (a NAT or firewall dropping
    #: an idle mapping, a pooler restarted on another host) is replaced at checkout instead of
    #: hanging the request's first statement. A round trip only after such a pause; off: never.
    ping_idle_after: Annotated[NonNegativeFloat | None, Off] = 30.0


def _replica_entry(value: object) -> object:
    """A replica is a URL, or a table `{ url = "...", weight = 2 }`."""
    return {"url": value} if isinstance(value, str | URL) else value


class ReplicaSettings(_Section):
    url: DatabaseUrl
    #: Share of reads under the `weighted` policy (relative to the other replicas).
    weight: PositiveInt = 1


class CredentialsSettings(_Section):
    """Where a cluster's password comes from, instead of its URLs (exactly one source):
    read at connect time, so a rotated secret is used by the next connection."""

    #: An environment variable holding the password.
    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: A file holding the password (re-read when it changes: mounted secrets rotate).
    file: Path | None = None
    #: `module:function`, an async function returning the password, or (password, seconds
    #: it stays valid), e.g. a cloud IAM token; cached until then.
    function: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialsSettings:
        given = [name for name in ("env", "file", "function") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file, function")
        return self


class ClusterSettings(_Section):
    """A primary and the streaming replicas that follow it.

    Either `primary` (and optionally `replicas`), or `nodes`: a list whose roles the health
    monitor discovers by asking each server `pg_is_in_recovery()`.
    """

    primary: DatabaseUrl | None = None
    replicas: list[Annotated[ReplicaSettings, BeforeValidator(_replica_entry)]] = Field(
        default_factory=list
    )
    nodes: list[DatabaseUrl] = Field(default_factory=list)
    pool: PoolSettings = PoolSettings()
    #: What stands between the router and these servers: "none", or "pgbouncer-transaction"
    #: (a transaction-mode pooler such as PgBouncer's `pool_mode = transaction`): then no
    #: prepared statement is cached or named twice, and tenant settings last one transaction.
    pooler: Literal["none", "pgbouncer-transaction"] = "none"
    #: The servers behind the pooler, by node (`primary`, `replica1`, `node1`...): health
    #: probes, the catalog listener and move locks connect there (a pooler answers even when
    #: its server is gone, and LISTEN or session locks cannot go through transaction pooling).
    probe_urls: dict[Identifier, DatabaseUrl] = Field(default_factory=dict)
    #: The password of every node of this cluster (and of its `probe_urls`), from a provider
    #: instead of the URLs (which must then carry none).
    credentials: CredentialsSettings | None = None
    #: A superuser connection to this cluster's primary, for online tenant moves only
    #: (`tenants move`: publications, subscriptions and replication need it; PostgreSQL 15
    #: lets only superusers create subscriptions). Sessions never use it.
    admin: DatabaseUrl | None = None

    @model_validator(mode="after")
    def _probe_urls_name_nodes(self) -> ClusterSettings:
        labels = {"primary"} if self.primary is not None else set()
        labels |= {f"replica{i}" for i in range(1, len(self.replicas) + 1)}
        labels |= {f"node{i}" for i in range(1, len(self.nodes) + 1)}
        unknown = sorted(set(self.probe_urls) - labels)
        if unknown:
            raise ValueError(f"probe_urls: no node named {', '.join(unknown)} here")
        missing = sorted(labels - set(self.probe_urls))
        if self.pooler != "none" and missing:
            # Else health would probe the pooler (always up), LISTEN and session locks
            # would go through transaction pooling: failures nobody would see.
            raise ValueError(
                f"probe_urls: behind a pooler, every node needs one ({', '.join(missing)})"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_passwords(self) -> ClusterSettings:
        if self.credentials is not None:
            urls = [self.primary, *(r.url for r in self.replicas), *self.nodes]
            urls += list(self.probe_urls.values())
            if any(url is not None and url.password for url in urls):
                raise ValueError(
                    "credentials: the URLs must not carry a password as well (one source)"
                )
        return self


class HealthSettings(_Section):
    """The background monitor: one probe per server per interval, on its own connection."""

    #: Seconds between probe rounds.
    interval: PositiveFloat = 1.0
    #: Seconds one probe (connect, or query) may take before the server counts as down.
    probe_timeout: PositiveFloat = 1.0
    #: Longest wait, in seconds, before re-trying a server that keeps failing.
    max_backoff: PositiveFloat = 30.0


class RoutingSettings(_Section):
    #: How reads pick among eligible replicas.
    policy: Literal["round_robin", "least_in_use", "weighted"] = "round_robin"
    #: A replica further behind than this (seconds of replay delay) receives no reads (off:
    #: no limit of this kind).
    max_replica_lag_seconds: Annotated[PositiveFloat | None, Off] = 10.0
    #: A replica further behind than this (bytes of WAL not yet replayed) receives no reads
    #: (off: no limit of this kind).
    max_replica_lag_bytes: Annotated[PositiveInt | None, Off] = 16 * 1024 * 1024
    #: With no eligible replica, read from the primary (READ ONLY) instead of failing.
    fallback_to_primary: bool = True
    #: Seconds a read with a consistency token that no replica has replayed (as last probed)
    #: may wait on a replica for it, checking its replay position, before going to the
    #: primary (0: go to the primary at once). 0.02 keeps most such reads off the primary
    #: when replicas are milliseconds behind.
    max_wait_for_replica: NonNegativeFloat = 0.0


class RetrySettings(_Section):
    """Retrying what is safe: connecting, and read-only work (never an uncertain COMMIT)."""

    #: Total seconds one unit of work may spend retrying before `DatabaseUnavailableError`.
    deadline: PositiveFloat = 3.0
    #: First backoff in seconds; doubles per attempt, with jitter, up to `max_backoff`.
    initial_backoff: PositiveFloat = 0.05
    max_backoff: PositiveFloat = 0.5


def _identifier(value: str) -> str:
    if not is_identifier(value):
        raise ValueError(f"expected {IDENTIFIER_RULE}")
    return value


def _tenant_schema(value: str) -> str:
    problem = schema_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _tenant_database(value: str) -> str:
    problem = database_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _tenant_id(value: str) -> str:
    if not is_tenant_id(value):
        raise ValueError(f"a tenant id is {TENANT_ID_RULE}")
    return value


Identifier = Annotated[str, AfterValidator(_identifier)]
TenantId = Annotated[str, AfterValidator(_tenant_id)]


class TenantSettings(_Section):
    """Where one tenant's data lives.

    - `database`: either `url` (the tenant's own server, primary only), or `database` on
      `cluster` (default: the default cluster; the tenant's reads then use that cluster's replicas),
      or just `cluster` (a cluster of its own, its configured database).
    - `schema`: schema `schema` (default: the tenant id) in `cluster`'s database.
    - `row`: shared tables in `cluster`'s database, isolated by row-level security.

    The one validation path for a tenant, whether it comes from the configuration file, a
    catalog row or `add_tenant`; what depends on the other tenants and clusters (references,
    storage owned by one tenant only) is `check_tenant` and `pg_session_router.core.storage`.
    """

    strategy: Literal["database", "schema", "row"]
    url: DatabaseUrl | None = None
    cluster: Identifier | None = None
    database: Annotated[str, AfterValidator(_tenant_database)] | None = None
    schema_name: Annotated[str, AfterValidator(_tenant_schema)] | None = Field(
        default=None, alias="schema"
    )
    active: bool = True

    @model_validator(mode="after")
    def _fields_fit_the_strategy(self) -> TenantSettings:
        if self.strategy == "database":
            if self.url is not None and (self.cluster or self.database):
                raise ValueError("give either url, or cluster and/or database, not both")
            if self.url is None and not (self.cluster or self.database):
                raise ValueError("strategy 'database' needs url, database or cluster")
            if self.url is not None:
                _tenant_database(self.url.database or "")
        elif self.url is not None or self.database is not None:
            field = "url" if self.url is not None else "database"
            raise ValueError(f"{field} is only for strategy 'database'")
        if self.schema_name is not None and self.strategy != "schema":
            raise ValueError("schema is only for strategy 'schema'")
        return self


class TenancySettings(_Section):
    """Tenants beyond the configuration file, and the engines of database-placed tenants."""

    #: Also look tenants up in the `tenants` table on the default cluster's primary.
    catalog: bool = True
    #: Seconds after which a catalogued tenant's placement is read again (in the background,
    #: serving the one held meanwhile). Changes are pushed at once; this is the safety net.
    catalog_ttl: PositiveFloat = 30.0
    #: Seconds an id the catalog does not have is answered 404 without asking it again.
    catalog_min_reload: PositiveFloat = 1.0
    #: Catalogued tenants' placements held per process (least recently used go first), and
    #: as many absent ids: memory stays flat however large the catalog.
    catalog_cache_size: PositiveInt = 10_000
    #: Engines (one per node of a tenant's database) kept open; least recently used go first.
    max_engines: PositiveInt = 100
    #: Pool of each tenant database engine.
    pool: PoolSettings = PoolSettings(size=2, max_overflow=0)
    #: Seconds a write of a tenant being switched to another cluster (`tenants move`) is
    #: held, waiting for the switch, before it gets 503 + Retry-After. Reads go on.
    move_write_pause: PositiveFloat = 5.0


class SessionSettings(_Section):
    """Options of every `AsyncSession` the router opens (SQLAlchemy's names and meanings)."""

    #: Keep loaded attributes after COMMIT (False: routes can return ORM objects after it).
    expire_on_commit: bool = False
    autoflush: bool = True
    #: Log every statement (SQLAlchemy `echo`); for development only.
    echo: bool = False


class DatabaseSettings(_Section):
    default_cluster: str = "main"
    clusters: dict[Identifier, ClusterSettings] = Field(default_factory=dict)
    tenants: dict[TenantId, TenantSettings] = Field(default_factory=dict)
    #: Seconds to establish one connection (TCP + startup), so a silent server cannot hang us.
    connect_timeout: PositiveFloat = 2.0
    #: Seconds a server may leave a pooled connection unanswered (no TCP acknowledgement, no
    #: answer to keepalive probes) before the kernel drops it: a statement on a connection cut
    #: without a FIN fails (and is replayed where that is safe) instead of hanging. A slow
    #: query is not cut: a live server's kernel answers while its backend works. Off: the
    #: operating system's defaults (a statement acknowledged before the cut then waits for
    #: ever). See `db/sockets.py`.
    dead_connection_timeout: Annotated[DeadAfterSeconds | None, Off] = 30.0
    health: HealthSettings = HealthSettings()
    routing: RoutingSettings = RoutingSettings()
    retry: RetrySettings = RetrySettings()
    tenancy: TenancySettings = TenancySettings()
    session: SessionSettings = SessionSettings()
    #: Most connections this process may hold across every pool (None, "off": no cap). Checked at
    #: startup against the pools' sizes, so it holds by construction, but for one thing: after
    #: a drain, sessions that were still running keep their connections to the drained server
    #: until they end, beside the pool's new ones. The health monitor's one connection per
    #: server, and the catalog listener's one, come on top.
    max_connections: Annotated[PositiveInt | None, Off] = None


#: HMAC-SHA256 keys shorter than the hash are brute-forceable; an empty one is no key at all.
MIN_SECRET_BYTES = 32


def _long_enough_secret(secret: SecretStr) -> SecretStr:
    if len(secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"at least {MIN_SECRET_BYTES} bytes")
    return secret


class HttpSettings(_Section):
    """How `install_router` wires a FastAPI app: the tenant resolver and consistency tokens."""

    tenant_resolver: Literal["header", "subdomain", "path", "token"] = "header"
    tenant_header: str = DEFAULT_TENANT_HEADER
    #: `subdomain`: requests to `<tenant>.<base_domain>` belong to `<tenant>`.
    base_domain: str | None = None
    #: `path`: the name of the path parameter holding the tenant id.
    tenant_path_param: str = "tenant"
    #: `token`: HS256 signing key of the bearer token, and the claim naming the tenant.
    token_secret: Annotated[SecretStr, AfterValidator(_long_enough_secret)] | None = None
    token_claim: str = "tenant"  # noqa: S105 - a claim name, not a secret
    #: `token`: when set, the token's `aud` must include it / its `iss` must equal it.
    token_audience: str | None = None
    token_issuer: str | None = None
    #: `GET /health/db` answers only `{"status": ...}` unless the request bears this token
    #: (`Authorization: Bearer ...`), or details are public (a local or demo deployment).
    health_token: Annotated[SecretStr, AfterValidator(_long_enough_secret)] | None = None
    health_details_public: bool = False
    #: `POST /admin/nodes/{node}/drain` and `.../undrain` (taking a server out of rotation),
    #: only for `Authorization: Bearer <this>`; without it, no admin endpoint (404).
    admin_token: Annotated[SecretStr, AfterValidator(_long_enough_secret)] | None = None
    #: Write responses carry `X-Consistency-Token`; reads that send it back see the write.
    #: Costs one query after each write's COMMIT.
    consistency_tokens: bool = True
    #: Also carry the token in a cookie (`pgrouter-consistency`), for browsers and clients
    #: that do not echo headers: set on write responses, read when no header is sent.
    consistency_cookie: bool = False
    #: Read-your-writes without any client cooperation: remember each tenant's last commit
    #: position and apply it to that tenant's reads that bring no token. "tenant": in this
    #: process (several app processes each remember only their own writes); "shared": in the
    #: router's `router_last_writes` table on the default primary, for every process (one
    #: upsert per write, one lookup per token-less read, on the primary).
    consistency_memory: Literal["off", "tenant", "shared"] = "off"
    #: Serve Prometheus metrics at `GET /metrics` (the `metrics` extra), to the requests that
    #: may see the health details (the metrics name nodes and servers).
    metrics: bool = False
    #: Label session counters by tenant id: only where tenants are few (cardinality).
    metrics_tenant_label: bool = False
    #: Serve the operators' page `GET /status` (nodes, lag chart, reads by reason), to the
    #: requests that may see the health details.
    status_page: bool = False
    #: An OpenTelemetry span per unit of work (the `tracing` extra; exported wherever the
    #: app's OpenTelemetry SDK sends spans).
    tracing: bool = False
    #: Debugging: `X-DB-Route: <node>; reason=<why>` on responses whose request used a
    #: session. Names a node: not for deployments whose topology is private.
    route_header: bool = False

    @model_validator(mode="after")
    def _tokens_behind_cookie_and_memory(self) -> HttpSettings:
        uses_tokens = self.consistency_cookie or self.consistency_memory != "off"
        if uses_tokens and not self.consistency_tokens:
            raise ValueError(
                "consistency_cookie and consistency_memory carry the tokens of writes: they "
                "need consistency_tokens = true"
            )
        return self

    @model_validator(mode="after")
    def _admin_token_of_its_own(self) -> HttpSettings:
        admin, health = self.admin_token, self.health_token
        # Monitoring credentials must not be able to take servers out of rotation.
        if (
            admin is not None
            and health is not None
            and admin.get_secret_value() == health.get_secret_value()
        ):
            raise ValueError("admin_token must differ from health_token")
        return self


class RouterSettings(BaseSettings):
    """Everything the router and its FastAPI face are configured by."""

    model_config = SettingsConfigDict(
        env_prefix=DEFAULT_ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=None,
        extra="ignore",
        frozen=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `toml_file` comes from model_config: None (no file) unless load_settings() names one.
        toml = TomlConfigSettingsSource(settings_cls)
        return (init_settings, env_settings, dotenv_settings, toml)


def format_validation_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> str:
    """`database.clusters.main.primary: not a valid URL`, one line per problem, no input values."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(part) for part in (*prefix, *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}")
    return "; ".join(lines)
