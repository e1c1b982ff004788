"""The library's exceptions: one hierarchy rooted in `RouterError`.

Every class carries the HTTP status the example app answers with, so the mapping lives next to
the meaning instead of in a table somewhere else. Messages are written for the person reading a
log or a 4xx body: they name what was wrong, and never include a password or a full URL. A 5xx
answers with the class's `public_detail` instead: it says what happened and never names a node,
a server or a cluster (the message, with those, goes to the log).
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error this package raises on purpose."""

    status_code: int = 500
    #: A stable, machine-readable code for JSON error bodies.
    code: str = "router_error"
    #: What a client is told when the status is 5xx (4xx bodies carry the message itself).
    public_detail: str = "internal error in the database layer"


class ConfigError(RouterError):
    """The configuration is invalid. Raised at startup, and names the offending key."""

    public_detail = "the service is misconfigured"

    code = "config_error"


class TargetError(RouterError):
    """A target names no cluster or node that exists (a programming error, not user input)."""

    code = "unknown_target"


class TenantError(RouterError):
    """Base for problems with the tenant a request asked for."""

    status_code = 400
    code = "tenant_error"


class InvalidTenantError(TenantError):
    """The tenant id is malformed (wrong characters or length)."""

    code = "invalid_tenant"


class TenantRequiredError(TenantError):
    """The route needs a tenant and the request named none."""

    code = "tenant_required"


class UnknownTenantError(TenantError):
    """The tenant id is well formed but no such tenant is registered."""

    status_code = 404
    code = "unknown_tenant"


class TenantInactiveError(TenantError):
    """The tenant exists but is disabled."""

    status_code = 403
    code = "tenant_inactive"


class DatabaseUnavailableError(RouterError):
    """No node could serve the unit of work (after retries, where retrying was safe)."""

    public_detail = "the database is unavailable right now; retry after the Retry-After delay"

    status_code = 503
    code = "database_unavailable"

    def __init__(
        self, message: str, *, retry_after: int = 1, last_error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The error of the last attempt, when retries were made (like tenacity's RetryError).
        self.last_error = last_error


class ReadOnlySessionError(RouterError):
    """A write was attempted through a session opened for reading."""

    public_detail = "internal error: a write was attempted in a read-only session"

    code = "read_only_session"


class NoNodeAvailableError(DatabaseUnavailableError):
    """Routing found no eligible node right now (all ejected, lagging, or none writable)."""

    public_detail = "no database server can serve this request right now; retry shortly"

    code = "no_node_available"


class ConnectionLostError(DatabaseUnavailableError):
    """The connection died in the middle of a unit of work; the transaction was rolled back."""

    public_detail = "the database connection was lost; nothing was committed; retry"

    code = "connection_lost"


class TopologyChangedError(DatabaseUnavailableError):
    """A write reached a node that is no longer a primary (failover); nothing was written."""

    public_detail = "the database primary changed; nothing was written; retry"

    code = "topology_changed"


class TenantMovingError(DatabaseUnavailableError):
    """The tenant is being switched to another cluster (`tenants move`) and the write could
    not wait for the switch to finish, or reached the old storage after it; nothing was
    written."""

    public_detail = "this tenant is being moved; nothing was written; retry shortly"

    code = "tenant_moving"


class CommitOutcomeUnknownError(RouterError):
    """The connection was lost during COMMIT: the transaction may or may not have committed.

    Never retried automatically: replaying could apply the write twice. The caller must check
    (for example by an idempotency key) before trying again.
    """

    public_detail = (
        "the connection was lost during COMMIT: the change may or may not have been applied"
    )

    code = "commit_outcome_unknown"


class TenantConflictError(TenantError):
    """A tenant management request conflicts with what exists (already added, or defined in
    the configuration file, where only the file can change it)."""

    status_code = 409
    code = "tenant_conflict"


class CrossTenantError(TenantError):
    """An object loaded for one tenant was handed to another tenant's session."""

    public_detail = "internal error: an object crossed tenants and was refused"

    status_code = 500
    code = "cross_tenant_object"


class InvalidTokenError(TenantError):
    """The bearer token that should name the tenant is missing its claim, expired, or forged."""

    status_code = 401
    code = "invalid_token"


class InvalidConsistencyTokenError(RouterError):
    """The consistency token sent with a read is not one the router issued."""

    status_code = 400
    code = "invalid_consistency_token"


class RouterNotInstalledError(RouterError):
    """A session dependency ran in an app that `install_router()` was never called on."""

    code = "router_not_installed"


class EventLoopMismatchError(RouterError):
    """The router's pools belong to another event loop than the one using it now.

    asyncpg connections are bound to the loop that opened them; using them from another loop
    fails later with "Future attached to a different loop" or "another operation is in
    progress". Typical cause: one event loop per test with a router built in an earlier test.
    """

    code = "event_loop_mismatch"


class TenantStorageMissingError(DatabaseUnavailableError):
    """A tenant's tables are not there (its migrations have not run, or not yet everywhere)."""

    code = "tenant_storage_missing"
    public_detail = "this tenant's data is not available right now; retry later"


class MigrationError(RouterError):
    """Bringing a target's tables to a revision failed; the target was left as it was."""

    code = "migration_failed"


class MoveError(RouterError):
    """A tenant move could not go on; the tenant stays where the catalog says it is."""

    code = "move_failed"


class CredentialsError(ConfigError):
    """A password provider could not give a password (a variable unset, a file unreadable,
    a function failing). Names the source, never a secret."""

    code = "credentials_error"
