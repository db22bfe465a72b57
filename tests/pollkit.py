"""Helpers of the waiting tests: a controllable clock, scripted jitter, batches, a log, trigger runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from airflow.sdk.module_loading import import_string

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    WrongObjectError,
)
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import BatchTrigger

START = 1_800_000_000.0
"""Where the controllable clock starts (epoch seconds)."""

TERMINAL = ["completed", "failed", "expired", "cancelled"]

TRANSIENT_ERRORS = [
    RateLimitError("slow down", status_code=429),
    ServerError("boom", status_code=502),
    APIConnectionError("reset", effect="unknown"),
    APIConnectionError("refused", effect="not_sent"),
    APITimeoutError("timed out"),
    WrongObjectError("about another batch", status_code=200),
]
"""Poll failures worth another poll: counted, and waited out with the error delay."""

FATAL_ERRORS = [
    QuotaExceededError("out of credit", status_code=429, code="insufficient_quota"),
    PermissionDeniedError("no", status_code=403),
    AuthenticationError("bad key", status_code=401),
    BadRequestError("bad", status_code=400),
    NotFoundError("no such batch", status_code=404),
    MalformedResponseError("not json", status_code=200),
    APIConnectionError("cannot help", effect=None),
    RuntimeError("not an API error at all"),
]
"""Poll failures no further poll can mend: the wait ends with an ``error`` event at once."""


def error_id(error: BaseException) -> str:
    return type(error).__name__ + (f"-{error.effect}" if isinstance(error, APIConnectionError) else "")


def batch(status: str = "in_progress", total: int = 10, completed: int = 0, failed: int = 0) -> Batch:
    return Batch.model_validate(
        {
            "id": "batch_1",
            "status": status,
            "request_counts": {"total": total, "completed": completed, "failed": failed},
        }
    )


class Fixed:
    """A jitter source that always draws ``value`` (0.5 is the mean; 0 and almost 1 the extremes)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class Cycle:
    """A jitter source that draws the given values in turn."""

    def __init__(self, values: list[float]) -> None:
        self.values = values or [0.5]
        self.drawn = 0

    def random(self) -> float:
        value = self.values[self.drawn % len(self.values)]
        self.drawn += 1
        return value


class XComTI:
    """A task instance that keeps the XComs pushed to it (they must serialize, as in Airflow)."""

    def __init__(self) -> None:
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)
        self.xcoms[key] = value


class RecordingLog:
    """A logger that keeps ``(level, message)`` with its arguments applied."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _record(self, level: str, msg: str, *args: Any) -> None:
        self.lines.append((level, msg % args if args else msg))

    def info(self, msg: str, *args: Any) -> None:
        self._record("info", msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._record("warning", msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self._record("error", msg, *args)

    def text(self, level: str | None = None) -> str:
        return "\n".join(m for lv, m in self.lines if level is None or lv == level)


class Clock:
    """
    A wall clock that moves only when someone sleeps on it (or :meth:`advance` is called).

    :param on_sleep: also called with each sleep's seconds, e.g. the emulator's ``advance_clock``, so the
        vendor's batches move on with the waiter's time and nobody really waits.
    """

    def __init__(self, start: float = START, on_sleep: Callable[[float], None] | None = None) -> None:
        self.now = start
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


def scripted_clock(emulator: Any, vendor: str, plan: list[tuple[float, str, str]]) -> Clock:
    """Return a clock forcing each ``(t, batch_id, status)`` at the emulator once it passes ``START + t``."""
    clock = Clock()
    pending = sorted(plan)

    def on_sleep(_: float) -> None:
        while pending and clock.now >= START + pending[0][0]:
            _, batch_id, status = pending.pop(0)
            emulator.force_status(vendor, batch_id, status)

    clock.on_sleep = on_sleep
    return clock


def batches_in(
    emulator: Any, make_batch: Callable[..., str], vendor: str, status: str = "in_progress", count: int = 3
) -> list[str]:
    """Create ``count`` batches (the parts of one job) and put each in ``status``; return their ids."""
    ids = [make_batch(vendor) for _ in range(count)]
    for batch_id in ids:
        emulator.force_status(vendor, batch_id, status)
    return ids


def waits_on(clock: Clock, module: Any, monkeypatch: Any) -> Clock:
    """Point the ``clock`` and ``sleep`` seams of ``module`` (the trigger's, or ``waiting``) at ``clock``."""
    monkeypatch.setattr(module, "clock", clock.clock)
    monkeypatch.setattr(module, "sleep", clock.asleep if module is trigger_module else clock.sleep)
    return clock


def count_sessions(monkeypatch: Any) -> list[str]:
    """Return the list the origin of every shared HTTP session created from now on is appended to."""
    created: list[str] = []
    real = transport._new_session

    async def counting(origin: str) -> transport.SharedSession:
        created.append(origin)
        return await real(origin)

    monkeypatch.setattr(transport, "_new_session", counting)
    return created


class Parking:
    """A trigger's sleep on ``clock`` that parks it for good, between two polls, after ``polls`` polls."""

    def __init__(self, clock: Clock, polls: int) -> None:
        self.clock = clock
        self.polls = polls
        self.parked = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await self.clock.asleep(seconds)
        if len(self.clock.sleeps) > self.polls:  # one sleep before each poll
            self.parked.set()
            await asyncio.Event().wait()  # where a triggerer usually finds its triggers when it stops


async def run_to_end(trigger: BatchTrigger) -> list[dict[str, Any]]:
    """Run a trigger as the triggerer does (every event, then ``cleanup``); return the event payloads."""
    try:
        return [event.payload async for event in trigger.run()]
    finally:
        await trigger.cleanup()


def rebuild(trigger: BatchTrigger) -> BatchTrigger:
    """Rebuild a trigger from its serialized form through JSON, as a restarted triggerer does."""
    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**json.loads(json.dumps(kwargs)))
    assert isinstance(rebuilt, BatchTrigger)
    return rebuilt


def log_text(entries: list[dict[str, Any]], level: str | None = None) -> str:
    return "\n".join(e["event"] for e in entries if level is None or e["log_level"] == level)


class ScriptedHook:
    """
    Stands in for the hook where the emulator cannot produce a case (an undocumented status, a slot wait).

    :param answers: what each poll returns (a status) or raises (an exception); the last one repeats.
    :param clock: the fake clock; each poll queues ``slot_wait`` s for its slot and takes ``poll_time`` s.
    """

    def __init__(
        self, answers: list[str | Exception], clock: Clock | None = None, *, slot_wait: float = 0.0
    ) -> None:
        self.answers = list(answers)
        self.clock = clock
        self.slot_wait = slot_wait
        self.poll_time = 0.0
        self.calls: list[tuple[str, float | None]] = []

    def _now(self) -> float | None:
        return self.clock.now if self.clock else None

    async def aslots(self) -> Any:
        @asynccontextmanager
        async def slot() -> Any:
            if self.clock:
                self.clock.advance(self.slot_wait)  # queued behind other polls for a connection
            yield

        return slot()

    async def aget_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        assert retry is False, "the trigger owns the schedule: one attempt per poll"
        self.calls.append(("get", self._now()))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if self.clock:
            self.clock.advance(self.poll_time)
        if isinstance(answer, Exception):
            raise answer
        return Batch.model_validate({"id": batch_id, "status": answer})

    async def acancel_batch(self, batch_id: str) -> Batch:
        self.calls.append(("cancel", self._now()))
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})

    async def aclose(self) -> None:
        self.calls.append(("close", self._now()))

    def count(self, call: str) -> int:
        return sum(1 for name, _ in self.calls if name == call)
