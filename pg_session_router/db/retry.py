"""The tenacity policy that retries what `driver_errors` calls safe, under one deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.util import await_only
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.core.settings import RetrySettings
from pg_session_router.db.driver_errors import describe_error
from pg_session_router.db.events import RouterObserver

T = TypeVar("T")


class StopAtDeadline:
    """tenacity stop: give up when the next attempt could not start before `deadline_at`."""

    def __init__(self, deadline_at: float) -> None:
        self.deadline_at = deadline_at

    def __call__(self, retry_state: RetryCallState) -> bool:
        upcoming_sleep = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + upcoming_sleep >= self.deadline_at


class RetryPolicy:
    """Exponential backoff with jitter under one total deadline, from `RetrySettings`."""

    def __init__(self, settings: RetrySettings, events: RouterObserver | None = None) -> None:
        self.settings = settings
        self.events = events if events is not None else RouterObserver()

    def deadline_at(self) -> float:
        return time.monotonic() + self.settings.deadline

    def _strategy(
        self, predicate: Callable[[BaseException], bool], deadline_at: float, kind: str
    ) -> dict[str, Any]:
        def report(retry_state: RetryCallState) -> None:
            error = retry_state.outcome.exception() if retry_state.outcome else None
            if error is not None:
                self.events.retried(kind, error)

        return {
            "before_sleep": report,
            "stop": StopAtDeadline(deadline_at),
            # Exponential from `initial_backoff`, capped, plus up to one initial step of jitter
            # so that many clients retrying a failed node do not move in lockstep.
            "wait": wait_exponential(
                multiplier=self.settings.initial_backoff, max=self.settings.max_backoff
            )
            + wait_random(0, self.settings.initial_backoff),
            "retry": retry_if_exception(predicate),
            "reraise": False,
        }

    def retrying(
        self, predicate: Callable[[BaseException], bool], deadline_at: float, kind: str = "run"
    ) -> AsyncRetrying:
        return AsyncRetrying(**self._strategy(predicate, deadline_at, kind))

    def retrying_in_greenlet(
        self, predicate: Callable[[BaseException], bool], deadline_at: float, kind: str
    ) -> Retrying:
        """The same policy for code that runs inside SQLAlchemy's greenlet (an event listener):
        synchronous attempts, sleeping on the event loop."""
        return Retrying(
            sleep=lambda seconds: await_only(asyncio.sleep(seconds)),
            **self._strategy(predicate, deadline_at, kind),
        )

    async def call(
        self,
        attempt_once: Callable[[], Awaitable[T]],
        retryable: Callable[[BaseException], bool],
        deadline_at: float,
        what: str,
        *,
        kind: str = "run",
    ) -> T:
        """`attempt_once()` until it succeeds, fails for good, or the deadline passes; then
        `DatabaseUnavailableError` carrying the last attempt's error (like tenacity's own
        RetryError, of which it is the router's version)."""
        try:
            async for attempt in self.retrying(retryable, deadline_at, kind):
                with attempt:
                    return await attempt_once()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            # Keep the kind when the last attempt knew it (NoNodeAvailableError: none eligible).
            known = type(last) if isinstance(last, DatabaseUnavailableError) else None
            raise (known or DatabaseUnavailableError)(
                f"could not {what} within {self.settings.deadline}s: {describe_error(last)}",
                last_error=last,
            ) from last
        raise AssertionError("unreachable: tenacity either returns or raises")
