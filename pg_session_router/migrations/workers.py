"""Migrating targets in parallel, in worker processes.

Why processes: Alembic's `op` and `context` are module-level proxies to the migration that
is running, so two migrations on one event loop (or in two threads) would interleave and
send one tenant's DDL to another. Each worker is a fresh interpreter (`spawn`: no inherited
event loop, pools or sockets) with its own router, taking targets from a shared queue one at
a time, so memory stays flat in the number of tenants and a slow tenant holds up one worker,
not a batch. Results come back as they finish; a worker that dies costs the target it held a
`failed` outcome, and the others finish the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from pg_session_router.core.settings import DatabaseSettings, RouterSettings
from pg_session_router.db.migrate import MigrationTarget
from pg_session_router.db.router import SessionRouter
from pg_session_router.migrations.plan import Action, AlembicMigrations, TargetOutcome
from pg_session_router.migrations.runner import run_target

_POLL_SECONDS = 0.5


async def run_in_workers(
    settings: RouterSettings,
    migrations: AlembicMigrations,
    action: Action,
    targets: Sequence[MigrationTarget],
    workers: int,
    report: Callable[[TargetOutcome], None],
) -> list[TargetOutcome]:
    """Outcomes in the order of `targets`. The waiting runs in a thread so that the caller's
    event loop (and its router) stays responsive."""
    # The database section only: it is a plain model (a host app's settings class may be
    # built at run time, with its own prefix, and would not pickle).
    job = _Job(settings.database, migrations, action)
    return await asyncio.to_thread(_run, job, list(targets), workers, report)


@dataclass(frozen=True, slots=True)
class _Job:
    """What every worker is given: the same for all of them."""

    settings: DatabaseSettings
    migrations: AlembicMigrations
    action: Action


def _run(
    job: _Job,
    targets: list[MigrationTarget],
    workers: int,
    report: Callable[[TargetOutcome], None],
) -> list[TargetOutcome]:
    context = multiprocessing.get_context("spawn")
    tasks: Any = context.Queue()
    results: Any = context.Queue()
    for item in enumerate(targets):
        tasks.put(item)
    for _ in range(workers):
        tasks.put(None)
    processes = [
        context.Process(target=_worker, args=(number, job, tasks, results), daemon=True)
        for number in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        return _collect(targets, processes, results, report)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _collect(
    targets: list[MigrationTarget],
    processes: Sequence[BaseProcess],
    results: Any,
    report: Callable[[TargetOutcome], None],
) -> list[TargetOutcome]:
    outcomes: dict[int, TargetOutcome] = {}
    held: dict[int, int] = {}  # worker number -> index of the target it is migrating
    dead: set[int] = set()  # workers seen dead at the last quiet poll
    while len(outcomes) < len(targets):
        try:
            message = results.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            _fail_dead_workers(targets, processes, held, dead, outcomes, report)
            if not any(process.is_alive() for process in processes):
                _fail_rest(targets, outcomes, report)
            continue
        kind, number, index, outcome = message
        if kind == "started":
            held[number] = index
        else:
            held.pop(number, None)
            outcomes[index] = outcome
            report(outcome)
    return [outcomes[index] for index in range(len(targets))]


def _fail_dead_workers(
    targets: list[MigrationTarget],
    processes: Sequence[BaseProcess],
    held: dict[int, int],
    dead: set[int],
    outcomes: dict[int, TargetOutcome],
    report: Callable[[TargetOutcome], None],
) -> None:
    """A worker dead at two quiet polls in a row lost its target. (One is not enough: its
    last message may still be on its way through the pipe when it has exited.)"""
    for number, process in enumerate(processes):
        if process.is_alive() or number not in held:
            continue
        if number not in dead:
            dead.add(number)
        else:
            index = held.pop(number)
            error = f"worker process exited with status {process.exitcode}"
            outcomes[index] = TargetOutcome(targets[index], "failed", error=error)
            report(outcomes[index])


def _fail_rest(
    targets: list[MigrationTarget],
    outcomes: dict[int, TargetOutcome],
    report: Callable[[TargetOutcome], None],
) -> None:
    for index, target in enumerate(targets):
        if index not in outcomes:
            outcomes[index] = TargetOutcome(target, "failed", error="no worker process left")
            report(outcomes[index])


def _worker(number: int, job: _Job, tasks: Any, results: Any) -> None:
    # Ctrl-C reaches every process of the group: the parent reports it, once.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_work(number, job, tasks, results))


def _parent_alive() -> bool:
    parent = multiprocessing.parent_process()
    return parent is None or parent.is_alive()


async def _work(number: int, job: _Job, tasks: Any, results: Any) -> None:
    router = SessionRouter(job.settings)
    try:
        if router.tenants.catalog is not None:
            await router.tenants.reload()  # a catalogued tenant's cluster needs its settings
        # The queue is filled before the workers start: get() returns at once. A parent that
        # was killed reads no more results: stop rather than migrate on unobserved.
        while _parent_alive() and (item := tasks.get()) is not None:
            index, target = item
            results.put(("started", number, index, None))
            outcome = await run_target(router, target, job.migrations, job.action)
            results.put(("done", number, index, outcome))
    finally:
        await router.dispose()
