"""Which tenant an HTTP request belongs to.

A resolver is a callable `(request) -> tenant id | None`; None means the request names no
tenant (fine on routes that need none; `TenantRequiredError` on those that do). The id is
validated later, by the registry, whatever the resolver: a resolver only extracts it.

- header (default): `X-Tenant-ID: acme`
- subdomain: `acme.example.com` with `http.base_domain = "example.com"`
- path: a path parameter, `/t/{tenant}/items` with `http.tenant_path_param = "tenant"`
- token: the `http.token_claim` claim of an HS256-signed bearer token (JWT), verified with
  `http.token_secret`; a missing, forged or expired token is `InvalidTokenError` (401).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any, TypeGuard

from starlette.requests import Request

from pg_session_router.core.errors import ConfigError, InvalidTenantError, InvalidTokenError
from pg_session_router.core.settings import DEFAULT_TENANT_HEADER, MIN_SECRET_BYTES, HttpSettings

TenantResolver = Callable[[Request], str | None]


class HeaderResolver:
    def __init__(self, header: str = DEFAULT_TENANT_HEADER) -> None:
        self.header = header.lower()

    def __call__(self, request: Request) -> str | None:
        values = request.headers.getlist(self.header)
        if len(values) > 1:
            # A gateway that appends its header after the client's would otherwise let the
            # client's value win: two values are refused, never guessed between.
            raise InvalidTenantError(f"more than one {self.header} header")
        return values[0] if values else None


class SubdomainResolver:
    def __init__(self, base_domain: str) -> None:
        self.suffix = "." + base_domain.lower().strip(".")

    def __call__(self, request: Request) -> str | None:
        host = request.headers.get("host", "").lower().rsplit(":", 1)[0]
        if not host.endswith(self.suffix):
            return None
        label = host[: -len(self.suffix)]
        # "a.b.example.com" is not a tenant subdomain: refuse rather than guess.
        return label if label and "." not in label else ("" if label else None)


class PathResolver:
    def __init__(self, param: str = "tenant") -> None:
        self.param = param

    def __call__(self, request: Request) -> str | None:
        value = request.path_params.get(self.param)
        return value if isinstance(value, str) else None


#: Longer bearer tokens are refused before any decoding (a tenant claim needs a few hundred).
MAX_TOKEN_LENGTH = 4096


class TokenClaimResolver:
    """Bearer JWT signed with HS256. The signature is verified before any JSON is parsed;
    then the token must carry a numeric `exp` in the future, a numeric `nbf` (if any) in the
    past, and the configured `aud` and `iss` (if configured). Only then is the claim read."""

    def __init__(
        self,
        secret: bytes,
        claim: str = "tenant",
        *,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"http.token_secret: at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.claim = claim
        self.audience = audience
        self.issuer = issuer

    def __call__(self, request: Request) -> str | None:
        authorization = request.headers.get("authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise InvalidTokenError("expected 'Authorization: Bearer <token>'")
        claims = self._verify(token.strip())
        tenant = claims.get(self.claim)
        if not isinstance(tenant, str):
            raise InvalidTokenError(f"the token has no {self.claim!r} claim")
        return tenant

    def _verify(self, token: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
            raise InvalidTokenError("malformed token")
        signing_input, _, signature_b64 = token.rpartition(".")
        try:
            signed = signing_input.encode("ascii")
            signature = _b64decode(signature_b64)
        except (ValueError, binascii.Error):
            raise InvalidTokenError("malformed token") from None
        expected = hmac.new(self._secret, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise InvalidTokenError("token signature does not verify")
        header_b64, _, payload_b64 = signing_input.partition(".")
        header, payload = _json_part(header_b64), _json_part(payload_b64)
        if header.get("alg") != "HS256":
            raise InvalidTokenError("unsupported token algorithm (expected HS256)")
        self._check_claims(payload)
        return payload

    def _check_claims(self, payload: dict[str, Any]) -> None:
        now = time.time()
        expires = payload.get("exp")
        if not _is_number(expires):
            raise InvalidTokenError("the token has no numeric 'exp' (expiry) claim")
        if expires <= now:
            raise InvalidTokenError("token expired")
        not_before = payload.get("nbf")
        if not_before is not None and (not _is_number(not_before) or not_before > now):
            raise InvalidTokenError("token not valid yet")
        if self.issuer is not None and payload.get("iss") != self.issuer:
            raise InvalidTokenError("token issuer not accepted")
        if self.audience is not None:
            audience = payload.get("aud")
            audiences = audience if isinstance(audience, list) else [audience]
            if self.audience not in audiences:
                raise InvalidTokenError("token audience not accepted")


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidTokenError("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidTokenError("malformed token")
    return value


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def sign_token(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT for `claims` (for tests, demos and scripts)."""

    def encode(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = encode(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{encode(signature)}"


def build_tenant_resolver(settings: HttpSettings) -> TenantResolver:
    if settings.tenant_resolver == "subdomain":
        if not settings.base_domain:
            raise ConfigError("http.base_domain: required by tenant_resolver = 'subdomain'")
        return SubdomainResolver(settings.base_domain)
    if settings.tenant_resolver == "path":
        return PathResolver(settings.tenant_path_param)
    if settings.tenant_resolver == "token":
        if settings.token_secret is None:
            raise ConfigError("http.token_secret: required by tenant_resolver = 'token'")
        return TokenClaimResolver(
            settings.token_secret.get_secret_value().encode(),
            settings.token_claim,
            audience=settings.token_audience,
            issuer=settings.token_issuer,
        )
    return HeaderResolver(settings.tenant_header)
