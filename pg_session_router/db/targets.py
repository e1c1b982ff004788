"""`Target`: what a caller asks the router for, and its small string grammar.

A target names a cluster (or the default one), optionally a tenant, an intent (`read` or
`write`) and optionally one node by name. Strings are a shorthand for scripts:

    "primary"            default cluster, write intent (with read_only=True: the primary, READ ONLY)
    "replica"            default cluster, read intent (a replica, else the primary read-only)
    "reports:replica"    cluster `reports`, read intent
    "main.replica1"      exactly that node (node names are `<cluster>.<primary|replicaN>`)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal

from pg_session_router.core.errors import TargetError
from pg_session_router.db.consistency import ConsistencyToken

Intent = Literal["read", "write"]

_ROLE_INTENTS: dict[str, Intent] = {"primary": "write", "replica": "read"}


@dataclass(frozen=True, slots=True)
class Target:
    cluster: str | None = None
    tenant: str | None = None
    intent: Intent = "write"
    node: str | None = None
    #: Reads go to the primary (in a READ ONLY transaction) instead of a replica.
    use_primary: bool = False
    #: Read-your-writes: serve the read only where this WAL position has been replayed.
    after: ConsistencyToken | None = None

    @property
    def read_only(self) -> bool:
        return self.intent == "read"

    @classmethod
    @functools.lru_cache(maxsize=256)  # scripts name a handful of targets, once per session
    def parse(cls, text: str) -> Target:
        cluster, sep, role = text.rpartition(":")
        if sep and not cluster:
            raise TargetError(f"target {text!r}: empty cluster name before ':'")
        if role in _ROLE_INTENTS:
            intent = _ROLE_INTENTS[role]
            return cls(cluster=cluster or None, intent=intent, use_primary=intent == "write")
        if not sep and "." in text:
            return cls(node=text, intent="write" if text.endswith(".primary") else "read")
        raise TargetError(
            f"target {text!r}: expected 'primary', 'replica', '<cluster>:primary|replica' "
            "or a node name like 'main.replica1'"
        )

    @classmethod
    def coerce(
        cls,
        target: Target | str | None,
        *,
        tenant: str | None = None,
        read_only: bool = False,
        after: ConsistencyToken | str | None = None,
    ) -> Target:
        """Merge the `get_db_context` arguments into one Target. `after`: a consistency
        token (or its text) the read must see, e.g. one a job was handed by the request
        that enqueued it."""
        if target is None:
            result = cls()
        elif isinstance(target, Target):
            result = target
        else:
            result = cls.parse(target)
        if tenant is not None:
            if result.tenant is not None and result.tenant != tenant:
                raise TargetError("a target cannot name two different tenants")
            result = replace(result, tenant=tenant)
        if read_only and result.intent != "read":
            result = replace(result, intent="read")
        if after is not None:
            token = ConsistencyToken.parse(after) if isinstance(after, str) else after
            result = replace(result, after=token)
        return result
