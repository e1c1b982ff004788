"""The retry policy on its own: backoff under one deadline, the last error carried along.

No server needed; the connection failures are real exceptions raised by a real attempt
function, the policy is the one every session uses. The tenacity floor in pyproject.toml
(8.3, the first release with `RetryCallState.upcoming_sleep`) was checked with this file.
"""

from __future__ import annotations

import time

import pytest

from pg_session_router.core.errors import DatabaseUnavailableError
from pg_session_router.core.settings import RetrySettings
from pg_session_router.db.driver_errors import is_connect_failure
from pg_session_router.db.retry import RetryPolicy

#: How late a loaded 2-core machine's event loop may wake a sleeper (not a retry's slack).
TIMER_LATENESS = 0.05


async def test_retries_until_the_deadline_then_carries_the_last_error() -> None:
    policy = RetryPolicy(RetrySettings(deadline=0.4, initial_backoff=0.02, max_backoff=0.1))
    attempts: list[float] = []

    async def refused() -> None:
        attempts.append(time.monotonic())
        raise ConnectionRefusedError(f"attempt {len(attempts)}")

    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError, match="could not connect") as raised:
        await policy.call(refused, is_connect_failure, policy.deadline_at(), "connect")
    # Never sleeps past the deadline: the last attempt is due before it (it starts when the
    # event loop wakes the sleeper, up to a few ms late on a loaded machine: 0.401 s was seen).
    assert attempts[-1] - started < 0.4 + TIMER_LATENESS
    assert len(attempts) >= 3
    assert isinstance(raised.value.last_error, ConnectionRefusedError)
    assert str(raised.value.last_error) == f"attempt {len(attempts)}"


async def test_what_is_not_retryable_is_raised_at_once() -> None:
    policy = RetryPolicy(RetrySettings(deadline=5.0))
    attempts = 0

    async def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        await policy.call(broken, is_connect_failure, policy.deadline_at(), "work")
    assert attempts == 1


async def test_a_success_after_failures_is_returned() -> None:
    policy = RetryPolicy(RetrySettings(deadline=2.0, initial_backoff=0.01))
    attempts = 0

    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionResetError("reset")
        return "served"

    assert await policy.call(flaky, is_connect_failure, policy.deadline_at(), "work") == "served"
    assert attempts == 3
