"""
The batch state machine, advanced lazily from a clock.

::

    validating ─► in_progress ─► finalizing ─► completed
        │              │  ╲
        ▼              ▼   ╲─► expired   (the window, or ``emulator_outcome=expired``, ran out)
      failed       cancelling ─► cancelled

Each read moves a batch through every transition whose time has come, stamping each at the moment it
happened, not the moment it was observed. Request counts grow linearly through ``in_progress``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from airflow_provider_llmbatch.emulator.config import EmulatorConfig
from airflow_provider_llmbatch.emulator.records import BatchRecord, Problem

TERMINAL: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLABLE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing"})
STATUSES: frozenset[str] = TERMINAL | CANCELLABLE | {"cancelling"}
OUTCOMES: frozenset[str] = frozenset({"completed", "failed", "expired", "cancelled"})
OUTCOME_KEY = "emulator_outcome"

Finisher = Callable[[BatchRecord, float], None]
"""Called once a batch reaches a terminal status, with the time it did; writes its result files."""


def enter(batch: BatchRecord, status: str, at: float) -> None:
    """Move a batch to ``status`` at time ``at``."""
    batch.status = status
    batch.phase_started_at = at
    batch.times[f"{status}_at"] = at
    if status == "in_progress":
        batch.processed_at_phase_start = batch.processed


def _progress(batch: BatchRecord, config: EmulatorConfig, at: float) -> int:
    start = batch.processed_at_phase_start
    full = config.phase_seconds("in_progress")
    fraction = 1.0 if full <= 0 else min(1.0, max(0.0, (at - batch.phase_started_at) / full))
    return start + math.floor((batch.total - start) * fraction)


def _phase_end(batch: BatchRecord, config: EmulatorConfig) -> float:
    duration = config.phase_seconds(batch.status)
    if batch.status == "in_progress" and batch.outcome in {"expired", "cancelled"}:
        # A forced early end happens half-way, so the partial results are exercised too.
        duration /= 2
    return batch.phase_started_at + duration


def advance(batch: BatchRecord, now: float, config: EmulatorConfig, finish: Finisher) -> None:
    """Apply every transition due by ``now``."""
    while not batch.held and batch.status not in TERMINAL:
        end = _phase_end(batch, config)
        expiring = batch.status in {"validating", "in_progress"} and batch.expires_at < end
        deadline = batch.expires_at if expiring else end
        if batch.status == "in_progress":
            batch.processed = _progress(batch, config, min(now, deadline))
        if now < deadline:
            return
        if expiring:
            _terminate(batch, "expired", deadline, finish)
        elif batch.status == "validating":
            _after_validating(batch, deadline, finish)
        elif batch.status == "in_progress":
            if batch.outcome == "expired":
                _terminate(batch, "expired", deadline, finish)
            elif batch.outcome == "cancelled":
                enter(batch, "cancelling", deadline)
            else:
                enter(batch, "finalizing", deadline)
        elif batch.status == "finalizing":
            _terminate(batch, "completed", deadline, finish)
        else:
            _terminate(batch, "cancelled", deadline, finish)


def _after_validating(batch: BatchRecord, at: float, finish: Finisher) -> None:
    if batch.info.problems:
        batch.errors = list(batch.info.problems)
        _terminate(batch, "failed", at, finish)
    elif batch.outcome == "failed":
        batch.errors = [_forced_failure()]
        _terminate(batch, "failed", at, finish)
    else:
        enter(batch, "in_progress", at)


def _forced_failure() -> Problem:
    return Problem("emulator_outcome", f"the batch failed as requested by metadata {OUTCOME_KEY}")


def _terminate(batch: BatchRecord, status: str, at: float, finish: Finisher) -> None:
    if status == "completed":
        batch.processed = batch.total
    enter(batch, status, at)
    batch.held = False
    finish(batch, at)


def request_cancel(batch: BatchRecord, now: float, config: EmulatorConfig, finish: Finisher) -> bool:
    """Start cancelling a batch; return False when it already ended (the vendor refuses)."""
    advance(batch, now, config, finish)
    if batch.status in TERMINAL:
        return False
    if batch.status in CANCELLABLE:
        if batch.status == "in_progress":
            batch.processed = _progress(batch, config, now)
        enter(batch, "cancelling", now)
        batch.held = False
    return True


def force(
    batch: BatchRecord, status: str, now: float, config: EmulatorConfig, finish: Finisher, *, hold: bool
) -> None:
    """
    Put a batch in ``status`` now; a terminal status writes the result files of the requests done so far.

    :param hold: for a non-terminal status, keep the batch there until forced again or cancelled.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    if batch.status == "in_progress" and not batch.held:
        batch.processed = _progress(batch, config, now)
    if status in TERMINAL:
        if status == "failed" and not batch.errors:
            batch.errors = [_forced_failure()]
        if status == "cancelled" and "cancelling_at" not in batch.times:
            batch.times["cancelling_at"] = now
        if batch.results_written:
            enter(batch, status, now)
            return
        _terminate(batch, status, now, finish)
        return
    enter(batch, status, now)
    batch.held = hold
