"""Password providers: a cluster's password from an environment variable, a file, or an async
function, read when a connection is made (asyncpg calls them at connect time).

PostgreSQL checks a password when a connection starts, never after: when the secret rotates,
connections already open keep working, and the next connection uses the new one (pools recycle
theirs every `pool.recycle` seconds). A provider's repr names its source, never the secret,
and so do its errors.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pg_session_router.core.errors import ConfigError, CredentialsError
from pg_session_router.core.settings import CredentialsSettings

#: A cached function result is refreshed this long before it expires.
EXPIRY_MARGIN = 30.0
#: How long a function's bare password (no lifetime given) is reused.
BARE_RESULT_SECONDS = 10.0


class EnvPassword:
    def __init__(self, variable: str) -> None:
        self.variable = variable

    async def __call__(self) -> str:
        value = os.environ.get(self.variable)
        if not value:
            raise CredentialsError(f"environment variable {self.variable} is not set")
        return value

    def __repr__(self) -> str:
        return f"<password from ${self.variable}>"


class FilePassword:
    """Re-read when the file changes (modification time, size or inode: a mounted secret is
    usually swapped by a symlink), else served from memory. A file that is briefly empty or
    unreadable (rewritten in place) serves the last password it held. The stat is a syscall
    on the event loop, as cheap as the connect it precedes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._value = ""

    async def __call__(self) -> str:
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if seen != self._seen:
                value = self.path.read_text().strip()
                if not value:
                    raise CredentialsError(f"password file {self.path} is empty")
                self._value, self._seen = value, seen
        except (OSError, UnicodeError, CredentialsError) as exc:
            if self._value:
                return self._value  # mid-rewrite: the last password it held
            if isinstance(exc, CredentialsError):
                raise
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CredentialsError(f"password file {self.path}: {why}") from None
        return self._value

    def __repr__(self) -> str:
        return f"<password from file {self.path}>"


class FunctionPassword:
    """`module:function`: an async function returning the password, or (password, seconds it
    stays valid). Called at connect time by one task that concurrent connects share (a
    connect's timeout never cancels it for the others); a result is cached until shortly
    before its lifetime ends (a bare password for `BARE_RESULT_SECONDS`). A failed call serves
    the last password while it is valid."""

    def __init__(self, reference: str) -> None:
        self.reference = reference
        self._function = _import(reference)
        self._value: str | None = None
        self._valid_until = 0.0  # refresh from then on
        self._expires = 0.0  # serve no longer than this, even when a refresh fails
        self._fetching: asyncio.Task[None] | None = None

    async def __call__(self) -> str:
        if self._value is None or time.monotonic() >= self._valid_until:
            fetching = self._fetching
            if fetching is None or fetching.done() or fetching.get_loop().is_closed():
                fetching = self._fetching = asyncio.get_running_loop().create_task(self._fetch())
            await asyncio.shield(fetching)
        assert self._value is not None
        return self._value

    async def _fetch(self) -> None:
        try:
            result = await self._function()
        except Exception as exc:
            if self._value is not None and time.monotonic() < self._expires:
                return
            raise CredentialsError(
                f"password function {self.reference} failed: {type(exc).__name__}"
            ) from None
        password, lifetime = result if isinstance(result, tuple) else (result, None)
        if not isinstance(password, str) or not password:
            raise CredentialsError(f"password function {self.reference} gave no password")
        now = time.monotonic()
        life = BARE_RESULT_SECONDS if lifetime is None else float(lifetime)
        self._value, self._expires = password, now + life
        self._valid_until = now + max(0.0, life - EXPIRY_MARGIN) if lifetime else now + life

    def __repr__(self) -> str:
        return f"<password from {self.reference}()>"


PasswordProvider = EnvPassword | FilePassword | FunctionPassword


def provider_of(settings: CredentialsSettings) -> PasswordProvider:
    if settings.env is not None:
        return EnvPassword(settings.env)
    if settings.file is not None:
        return FilePassword(settings.file)
    assert settings.function is not None
    return FunctionPassword(settings.function)


def _import(reference: str) -> Callable[[], Awaitable[Any]]:
    module_name, _, name = reference.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"credentials.function: cannot import {reference}: {exc}") from None
    if not inspect.iscoroutinefunction(function):
        raise ConfigError(f"credentials.function: {reference} is not an async function")
    return function  # type: ignore[no-any-return]
