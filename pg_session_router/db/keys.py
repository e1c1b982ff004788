"""`ClusterKey`: which cluster a unit of work runs on, as a value instead of a string.

Three kinds: a configured cluster (`main`), a tenant's database on a configured cluster's
servers (`main@acme`: same servers, same replicas, same WAL), and a tenant's server of its own
(`@umbrella`, from the tenant's `url`). `name` is the string form used in node names, logs and
`router.cluster("...")`; `parse` reads it back, the one place that does.

A named tuple rather than a frozen dataclass: keys are hashed and compared on every tenant
unit of work (dictionary lookups of the topology and the engine cache), and a tuple does both
in C, where a dataclass runs a Python `__hash__` and `__eq__` each time.
"""

from __future__ import annotations

from typing import NamedTuple

from pg_session_router.core.errors import TargetError


class ClusterKey(NamedTuple):
    #: The configured cluster whose servers hold the data (None: the tenant's own server).
    cluster: str | None
    #: A database other than the cluster's own (a `database` tenant on shared servers).
    database: str | None = None
    #: The tenant whose own server (`url`) this is.
    own_server_of: str | None = None

    @classmethod
    def configured(cls, name: str) -> ClusterKey:
        return cls(name)

    @classmethod
    def tenant_database(cls, cluster: str, database: str) -> ClusterKey:
        return cls(cluster, database=database)

    @classmethod
    def own_server(cls, tenant_id: str) -> ClusterKey:
        return cls(None, own_server_of=tenant_id)

    @classmethod
    def parse(cls, text: str) -> ClusterKey:
        base, sep, rest = text.partition("@")
        if not sep:
            return cls.configured(text)
        if not rest:
            raise TargetError(f"no cluster named {text!r}")
        return cls.tenant_database(base, rest) if base else cls.own_server(rest)

    @property
    def name(self) -> str:
        if self.own_server_of is not None:
            return f"@{self.own_server_of}"
        assert self.cluster is not None
        return self.cluster if self.database is None else f"{self.cluster}@{self.database}"

    @property
    def stream(self) -> str:
        """The WAL stream: databases on one cluster's servers share that cluster's WAL."""
        return self.cluster if self.cluster is not None else self.name

    @property
    def is_configured(self) -> bool:
        return self.database is None and self.own_server_of is None

    def __str__(self) -> str:
        return self.name
