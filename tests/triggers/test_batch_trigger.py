from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import httpx
import pytest
from airflow.sdk import BaseHook
from airflow.sdk.module_loading import import_string
from structlog.testing import capture_logs

from airflow_provider_llmbatch.emulator import FaultRule
from airflow_provider_llmbatch.exceptions import (
    APITimeoutError,
    BadRequestError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
)
from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import CLASSPATH, MAX_CONCURRENT_POLLS, BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
TERMINAL = ["completed", "failed", "expired", "cancelled"]


class FakeTime:
    """A wall clock that only moves when the trigger sleeps."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(trigger_module, "clock", fake.clock)
    monkeypatch.setattr(trigger_module, "sleep", fake.sleep)
    return fake


@pytest.fixture
def trigger_logs() -> Iterator[list[dict[str, Any]]]:
    """Capture the trigger's structured log entries (Airflow's loggers are structlog, not stdlib)."""
    with capture_logs() as entries:
        yield entries


def log_text(entries: list[dict[str, Any]], level: str | None = None) -> str:
    return "\n".join(e["event"] for e in entries if level is None or e["log_level"] == level)


@pytest.fixture
def fast_sleep(monkeypatch) -> list[float]:
    """Keep real time (the emulator's batches move on it) but never wait long."""
    asked: list[float] = []

    async def short(seconds: float) -> None:
        asked.append(seconds)
        await asyncio.sleep(min(seconds, 0.02))

    monkeypatch.setattr(trigger_module, "sleep", short)
    return asked


async def run_to_end(trigger: BatchTrigger) -> list[dict[str, Any]]:
    try:
        return [event.payload async for event in trigger.run()]
    finally:
        await trigger.cleanup()


def rebuild(trigger: BatchTrigger) -> BatchTrigger:
    classpath, kwargs = trigger.serialize()
    return import_string(classpath)(**json.loads(json.dumps(kwargs)))


# -- serialization ---------------------------------------------------------------------------------


def test_serialize_returns_exactly_the_constructor_kwargs():
    kwargs = {
        "conn_id": "llmbatch_zhipu",
        "batch_id": "batch_1",
        "poll_interval": 5.0,
        "max_poll_interval": 60.0,
        "deadline": 1_800_000_123.5,
        "cancel_on_kill": False,
        "cancel_on_timeout": False,
        "max_consecutive_errors": 3,
    }
    classpath, serialized = BatchTrigger(**kwargs).serialize()
    assert classpath == CLASSPATH == "airflow_provider_llmbatch.triggers.batch.BatchTrigger"
    assert serialized == kwargs
    assert json.loads(json.dumps(serialized)) == serialized
    assert all(v is None or isinstance(v, str | int | float | bool) for v in serialized.values())
    assert rebuild(BatchTrigger(**kwargs)).serialize() == (classpath, kwargs)


def test_defaults_round_trip():
    classpath, kwargs = BatchTrigger("c", "b").serialize()
    assert kwargs == {
        "conn_id": "c",
        "batch_id": "b",
        "poll_interval": 30.0,
        "max_poll_interval": 600.0,
        "deadline": None,
        "cancel_on_kill": True,
        "cancel_on_timeout": True,
        "max_consecutive_errors": 10,
    }
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)


@pytest.mark.parametrize(
    "old_kwargs",
    [
        {"conn_id": "c", "batch_id": "b"},
        {"conn_id": "c", "batch_id": "b", "poll_interval": 10},
        {"conn_id": "c", "batch_id": "b", "poll_interval": 10, "max_poll_interval": 60, "deadline": 1e9},
    ],
)
def test_payload_of_an_older_release_still_loads(old_kwargs):
    trigger = import_string(CLASSPATH)(**old_kwargs)
    _, kwargs = trigger.serialize()
    assert kwargs.items() >= {k: v for k, v in old_kwargs.items()}.items()
    assert set(kwargs) == set(BatchTrigger("c", "b").serialize()[1])


def test_airflow_serializer_round_trip():
    from airflow.serialization.serialized_objects import BaseSerialization

    trigger = BatchTrigger("c", "b", deadline=1_800_000_000.0)
    classpath, kwargs = trigger.serialize()
    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    assert import_string(classpath)(**restored).serialize() == (classpath, kwargs)


# -- one event per run, every terminal status ------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("status", TERMINAL)
async def test_every_terminal_status(emulator, connect, make_batch, fast_sleep, vendor, status):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, status)
    events = await run_to_end(BatchTrigger(connect(vendor), batch_id, poll_interval=0.05))
    assert len(events) == 1
    event = events[0]
    assert event["event"] == "terminal"
    assert event["batch"]["batch_id"] == batch_id
    assert event["batch"]["status"] == status
    assert event["polls"] == 1
    assert status in event["message"]
    assert json.loads(json.dumps(event)) == event


@pytest.mark.asyncio
@pytest.mark.parametrize("outcome", TERMINAL)
async def test_natural_endings_by_metadata(emulator, connect, make_batch, fast_sleep, outcome):
    batch_id = make_batch("openai", metadata={"emulator_outcome": outcome})
    events = await run_to_end(
        BatchTrigger(connect("openai"), batch_id, poll_interval=0.05, max_poll_interval=0.1)
    )
    assert [e["event"] for e in events] == ["terminal"]
    assert events[0]["batch"]["status"] == outcome
    if outcome == "completed":
        assert events[0]["batch"]["output_file_id"]
        assert events[0]["batch"]["request_counts"]["completed"] == 3


@pytest.mark.asyncio
async def test_run_yields_once_and_returns(emulator, connect, make_batch, fast_sleep):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    trigger = BatchTrigger(connect("zhipu"), batch_id)
    agen = trigger.run()
    first = await agen.__anext__()
    assert first.payload["event"] == "terminal"
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()
    await trigger.cleanup()


@pytest.mark.asyncio
@pytest.mark.parametrize(("quiet_seconds", "lines"), [(trigger_module.QUIET_LOG_SECONDS, 2), (0.0, 4)])
async def test_progress_is_logged_when_it_changes_or_after_a_quiet_spell(
    emulator, connect, make_batch, fake_time, trigger_logs, monkeypatch, quiet_seconds, lines
):
    monkeypatch.setattr(trigger_module, "QUIET_LOG_SECONDS", quiet_seconds)
    batch_id = make_batch("dashscope", requests=4)
    emulator.force_status("dashscope", batch_id, "in_progress")

    real_sleep = fake_time.sleep

    async def finish_after_three(seconds: float) -> None:
        await real_sleep(seconds)
        if len(fake_time.sleeps) == 3:
            await asyncio.to_thread(emulator.force_status, "dashscope", batch_id, "completed")

    trigger_module.sleep = finish_after_three  # restored by the fake_time fixture's monkeypatch
    events = await run_to_end(BatchTrigger(connect("dashscope"), batch_id, poll_interval=10))
    assert events[0]["polls"] == 4
    progress = [e["event"] for e in trigger_logs if "rate" in e["event"]]
    assert len(progress) == lines  # three polls saw the same in_progress counts, the fourth the end
    assert all("ETA" in line and "of 4" in line for line in progress)
    assert "status in_progress" in progress[0]
    assert "status completed" in progress[-1]


# -- waiting behaviour -----------------------------------------------------------------------------


class ScriptedHook:
    """Stands in for the hook where the emulator cannot produce a case (an undocumented status)."""

    def __init__(self, statuses: list[str]) -> None:
        self.statuses = statuses
        self.calls: list[str] = []

    async def aget_batch(self, batch_id: str) -> Batch:
        self.calls.append("get")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return Batch.model_validate({"id": batch_id, "status": status})

    async def acancel_batch(self, batch_id: str) -> Batch:
        self.calls.append("cancel")
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})

    async def aclose(self) -> None:
        self.calls.append("close")


@pytest.mark.asyncio
async def test_first_poll_is_immediate(fake_time):
    trigger = BatchTrigger("unused", "b1", poll_interval=30)
    hook = ScriptedHook(["in_progress", "completed"])
    trigger._hook = hook
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert hook.calls[:1] == ["get"]
    assert len(fake_time.sleeps) == 1
    assert fake_time.sleeps[0] <= 30 * 0.25


@pytest.mark.asyncio
async def test_unknown_status_keeps_polling_until_the_deadline(fake_time, trigger_logs):
    trigger = BatchTrigger("unused", "b1", poll_interval=30, deadline=fake_time.now + 600)
    hook = ScriptedHook(["paused_by_vendor"])
    trigger._hook = hook
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["timeout"]
    assert hook.calls.count("get") > 3
    assert "cancel" in hook.calls
    assert events[0]["batch"]["status"] == "cancelling"
    assert "paused_by_vendor" in log_text(trigger_logs, "warning")


@pytest.mark.asyncio
async def test_delays_never_exceed_the_cap(fake_time):
    trigger = BatchTrigger(
        "unused", "b1", poll_interval=30, max_poll_interval=120, deadline=fake_time.now + 86_400
    )
    trigger._hook = ScriptedHook(["in_progress"])
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    assert max(fake_time.sleeps) <= 120
    assert fake_time.sleeps[0] <= 30 * 0.25
    # adaptive: waits grow from the first poll to the cap
    assert fake_time.sleeps[-2] > fake_time.sleeps[0]
    assert fake_time.now == pytest.approx(trigger.deadline)


@pytest.mark.asyncio
async def test_deadline_cancels_the_batch(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    trigger = BatchTrigger(connect("moonshot"), batch_id, poll_interval=30, deadline=fake_time.now + 3600)
    events = await run_to_end(trigger)
    assert len(events) == 1
    event = events[0]
    assert event["event"] == "timeout"
    assert event["batch"]["batch_id"] == batch_id
    assert event["batch"]["status"] in {"cancelling", "cancelled"}
    assert "deadline" in event["message"]
    assert "cancel requested" in event["message"]
    assert emulator.batch("moonshot", batch_id)["status"] in {"cancelling", "cancelled"}
    assert fake_time.now == pytest.approx(trigger.deadline)
    assert sum(fake_time.sleeps) == pytest.approx(3600)


@pytest.mark.asyncio
async def test_deadline_without_cancel_leaves_the_batch(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(
        connect("openai"), batch_id, poll_interval=30, deadline=fake_time.now + 600, cancel_on_timeout=False
    )
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    assert "left running" in events[0]["message"]
    assert emulator.batch("openai", batch_id)["status"] == "in_progress"


@pytest.mark.asyncio
async def test_terminal_at_the_deadline_wins_over_timeout(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    trigger = BatchTrigger(connect("zhipu"), batch_id, deadline=fake_time.now - 10)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert emulator.batch("zhipu", batch_id)["status"] == "completed"


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["503", "500", "429", "reset"])
async def test_transient_errors_recover(emulator, connect, make_batch, fake_time, kind, trigger_logs):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    emulator.add_fault(FaultRule(kind, vendor="openai", operation="get_batch", times=3))
    trigger = BatchTrigger(connect("openai"), batch_id, poll_interval=30, max_consecutive_errors=4)
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["terminal"]
    assert events[0]["polls"] == 4
    assert len(fake_time.sleeps) == 3
    # backoff grows between failed polls
    assert fake_time.sleeps == sorted(fake_time.sleeps)
    assert log_text(trigger_logs, "warning").count("will retry") == 3


@pytest.mark.asyncio
async def test_persistent_outage_gives_a_bounded_error(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("dashscope")
    emulator.add_fault(FaultRule("503", vendor="dashscope", operation="get_batch", times=None))
    trigger = BatchTrigger(connect("dashscope"), batch_id, poll_interval=30, max_consecutive_errors=5)
    events = await run_to_end(trigger)
    assert len(events) == 1
    event = events[0]
    assert event["event"] == "error"
    assert event["polls"] == 5
    assert "5 times in a row" in event["message"]
    assert "503" in event["message"]
    assert len(fake_time.sleeps) == 4


@pytest.mark.asyncio
async def test_hook_retries_count_as_one_poll(emulator, connect, make_batch, monkeypatch):
    """With the connection's own retries on, short blips never reach the trigger's error count."""
    from airflow_provider_llmbatch.retry import RetryPolicy

    monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempt: 0.0)
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    emulator.add_fault(FaultRule("503", vendor="zhipu", operation="get_batch", times=2))
    conn_id = connect("zhipu", "retrying_zhipu", max_retries=3)
    trigger = BatchTrigger(conn_id, batch_id, max_consecutive_errors=1)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert events[0]["polls"] == 1


@pytest.mark.asyncio
async def test_retry_after_is_honoured(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    emulator.add_fault(FaultRule("429_retry_after", vendor="openai", operation="get_batch", retry_after=42))
    events = await run_to_end(
        BatchTrigger(connect("openai"), batch_id, poll_interval=1, max_poll_interval=300)
    )
    assert events[0]["event"] == "terminal"
    assert fake_time.sleeps == [pytest.approx(42)]


class FailingHook(ScriptedHook):
    def __init__(self, error: Exception) -> None:
        super().__init__(["in_progress"])
        self.error = error

    async def aget_batch(self, batch_id: str) -> Batch:
        self.calls.append("get")
        raise self.error


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (QuotaExceededError("out of credit", status_code=429, code="insufficient_quota"), False),
        (PermissionDeniedError("no", status_code=403), False),
        (BadRequestError("bad", status_code=400), False),
        (MalformedResponseError("not json", status_code=200), False),
        (RateLimitError("slow down", status_code=429), True),
        (ServerError("boom", status_code=502), True),
        (APITimeoutError("timed out"), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
async def test_error_classes(fake_time, error, transient):
    trigger = BatchTrigger("unused", "b1", max_consecutive_errors=3)
    hook = FailingHook(error)
    trigger._hook = hook
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["error"]
    assert hook.calls.count("get") == (3 if transient else 1)
    assert str(error) in events[0]["message"]


@pytest.mark.asyncio
async def test_polls_in_flight_are_bounded_per_connection(fake_time):
    in_flight: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    stuck = asyncio.Event()

    class SlowHook(ScriptedHook):
        def __init__(self, conn: str) -> None:
            super().__init__(["completed"])
            self.conn = conn

        async def aget_batch(self, batch_id: str) -> Batch:
            in_flight[self.conn] += 1
            peak[self.conn] = max(peak[self.conn], in_flight[self.conn])
            try:
                if self.conn == "a":
                    await stuck.wait()  # an outage on connection a
                else:
                    await asyncio.sleep(0.001)
                return await super().aget_batch(batch_id)
            finally:
                in_flight[self.conn] -= 1

    def make(conn: str, i: int) -> BatchTrigger:
        trigger = BatchTrigger(f"conn_{conn}", f"b{i}")
        trigger._hook = SlowHook(conn)
        return trigger

    stuck_tasks = [asyncio.create_task(run_to_end(make("a", i))) for i in range(3 * MAX_CONCURRENT_POLLS)]
    others = await asyncio.wait_for(
        asyncio.gather(*(run_to_end(make("b", i)) for i in range(40))), timeout=10
    )
    assert all(events[0]["event"] == "terminal" for events in others)
    assert peak["a"] == MAX_CONCURRENT_POLLS
    assert 1 < peak["b"] <= MAX_CONCURRENT_POLLS
    stuck.set()
    assert all(events[0]["event"] == "terminal" for events in await asyncio.gather(*stuck_tasks))


@pytest.mark.asyncio
async def test_not_found_fails_at_once(emulator, connect, fake_time):
    events = await run_to_end(BatchTrigger(connect("openai"), "batch_missing", max_consecutive_errors=10))
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["polls"] == 1
    assert fake_time.sleeps == []
    assert NotFoundError.__name__ in events[0]["message"]


@pytest.mark.asyncio
async def test_wrong_key_fails_at_once(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("moonshot")
    conn_id = connect("moonshot", "bad_key", key="sk-wrong-key-123")
    events = await run_to_end(BatchTrigger(conn_id, batch_id))
    assert events[0]["event"] == "error"
    assert "AuthenticationError" in events[0]["message"]
    assert "sk-wrong-key-123" not in json.dumps(events)


@pytest.mark.asyncio
async def test_missing_connection_is_an_error_event(emulator, fake_time):
    events = await run_to_end(BatchTrigger("no_such_connection_anywhere", "b1"))
    assert events[0]["event"] == "error"
    assert "no_such_connection_anywhere" in events[0]["message"]


@pytest.mark.asyncio
async def test_run_does_no_sync_io(emulator, connect, make_batch, fast_sleep, monkeypatch):
    batch_id = make_batch("openai")
    conn_id = connect("openai")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("sync I/O inside the trigger")

    monkeypatch.setattr(httpx.Client, "send", forbidden)
    monkeypatch.setattr(BaseHook, "get_connection", classmethod(forbidden))
    events = await run_to_end(BatchTrigger(conn_id, batch_id, poll_interval=0.05, max_poll_interval=0.1))
    assert events[0]["event"] == "terminal"


# -- restart, kill, cleanup -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_triggerer_restart_resumes_from_serialized_kwargs(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    deadline = fake_time.now + 7200
    trigger = BatchTrigger(connect("zhipu"), batch_id, poll_interval=30, deadline=deadline)
    polled_twice = asyncio.Event()
    real_sleep = fake_time.sleep

    async def counting(seconds: float) -> None:
        await real_sleep(seconds)
        if len(fake_time.sleeps) >= 2:
            polled_twice.set()
            await asyncio.Event().wait()  # park like a trigger between polls

    trigger_module.sleep = counting
    task = asyncio.create_task(run_to_end(trigger))
    await asyncio.wait_for(polled_twice.wait(), timeout=10)
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    # A restart is not a kill: the batch keeps running.
    assert emulator.batch("zhipu", batch_id)["status"] == "in_progress"
    assert _pool.shared_clients() == {}

    trigger_module.sleep = real_sleep
    rebuilt = rebuild(trigger)
    assert rebuilt.deadline == deadline
    emulator.force_status("zhipu", batch_id, "completed")
    events = await run_to_end(rebuilt)
    assert [e["event"] for e in events] == ["terminal"]
    assert events[0]["batch"]["batch_id"] == batch_id
    assert events[0]["batch"]["status"] == "completed"


@pytest.mark.asyncio
@pytest.mark.parametrize("vendor", VENDORS)
async def test_on_kill_cancels(emulator, connect, make_batch, vendor):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, "in_progress")
    trigger = BatchTrigger(connect(vendor), batch_id)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch(vendor, batch_id)["status"] in {"cancelling", "cancelled"}


@pytest.mark.asyncio
async def test_on_kill_respects_cancel_on_kill(emulator, connect, make_batch):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(connect("openai"), batch_id, cancel_on_kill=False)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch("openai", batch_id)["status"] == "in_progress"


@pytest.mark.asyncio
async def test_on_kill_of_a_finished_batch_does_not_raise(emulator, connect, make_batch):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "completed")
    trigger = BatchTrigger(connect("moonshot"), batch_id)
    await trigger.on_kill()
    await trigger.cleanup()
    assert emulator.batch("moonshot", batch_id)["status"] == "completed"


@pytest.mark.asyncio
async def test_kill_during_run_then_on_kill(emulator, connect, make_batch, fast_sleep):
    """The triggerer's order on a user kill: cancel run(), await on_kill(), then cleanup()."""
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "in_progress")
    trigger = BatchTrigger(connect("dashscope"), batch_id, poll_interval=0.05)
    events: list[Any] = []

    async def consume() -> None:
        async for event in trigger.run():
            events.append(event)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel("user action")
    with suppress(asyncio.CancelledError):
        await task
    await trigger.on_kill()
    await trigger.cleanup()
    assert events == []
    assert emulator.batch("dashscope", batch_id)["status"] in {"cancelling", "cancelled"}
    assert _pool.shared_clients() == {}


@pytest.mark.asyncio
async def test_cleanup_releases_the_shared_client(emulator, connect, make_batch, fast_sleep):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    trigger = BatchTrigger(connect("openai"), batch_id)
    async for _ in trigger.run():
        assert sum(_pool.shared_clients().values()) == 1
    await trigger.cleanup()
    assert _pool.shared_clients() == {}
    await trigger.cleanup()  # idempotent


# -- secrets ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_no_secret_in_kwargs_events_or_logs(
    emulator, connect, make_batch, fake_time, caplog, trigger_logs
):
    caplog.set_level(logging.DEBUG)
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(connect("openai"), batch_id, deadline=fake_time.now + 300)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    key = emulator.api_key
    assert key not in json.dumps(trigger.serialize())
    assert key not in json.dumps(events)
    logged = caplog.text + json.dumps(trigger_logs, default=str)
    assert "did not finish before the deadline" in logged
    assert key not in logged
    assert "Bearer" not in logged


# -- many triggers in one loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_emulator() -> Iterator[str]:
    """
    Serve the emulator from its own process, as a vendor is: in-process, its request handling would
    compete with the loop under test for the GIL and the lag measured would be the emulator's.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_llmbatch.emulator", "--port", "0", "--time-scale", "0.1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert url, f"emulator did not start: {first!r}"
        yield url.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.asyncio
async def test_many_triggers_share_one_client_and_keep_the_loop_responsive(
    remote_emulator, monkeypatch, tmp_path
):
    triggers_count, batches_count, latency = 200, 20, 0.2
    admin = f"{remote_emulator}/_emulator"
    spec = REGISTRY["openai"]
    conn = {
        "conn_type": spec.conn_type,
        "host": remote_emulator + spec.emulator_prefix,
        "password": "emulator-key",
    }
    monkeypatch.setenv("AIRFLOW_CONN_MANY_OPENAI", json.dumps({**conn, "extra": {"max_retries": 0}}))
    request_file = tmp_path / "one.jsonl"
    line = {
        "custom_id": "r",
        "method": "POST",
        "url": spec.default_endpoint,
        "body": {"model": "m", "messages": []},
    }
    request_file.write_text(json.dumps(line) + "\n")
    with BatchHook("many_openai") as hook:
        input_file = hook.upload_file(str(request_file))
        batch_ids = [hook.create_batch(input_file_id=input_file.id).id for _ in range(batches_count)]
    for batch_id in batch_ids:
        httpx.post(
            f"{admin}/batches/openai/{batch_id}/status", json={"status": "in_progress"}
        ).raise_for_status()
    httpx.post(f"{admin}/latency", json={"seconds": latency}).raise_for_status()

    created: list[object] = []
    new_client = _pool._new_client

    def counting_new_client(timeout: float) -> httpx.AsyncClient:
        created.append(timeout)
        return new_client(timeout)

    monkeypatch.setattr(_pool, "_new_client", counting_new_client)
    triggers = [
        BatchTrigger("many_openai", batch_ids[i % batches_count], poll_interval=0.1, max_poll_interval=0.2)
        for i in range(triggers_count)
    ]
    stop = asyncio.Event()
    lags: list[float] = []
    clients_seen: list[dict[tuple[str, float], int]] = []

    async def watchdog() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.05)
            lags.append(time.perf_counter() - started - 0.05)
            clients_seen.append(_pool.shared_clients())

    def complete_all() -> None:
        for batch_id in batch_ids:
            httpx.post(f"{admin}/batches/openai/{batch_id}/status", json={"status": "completed"})

    async def finish_later() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(complete_all)

    dog = asyncio.create_task(watchdog())
    finisher = asyncio.create_task(finish_later())
    tasks = []
    for trigger in triggers:
        # As the triggerer creates them (TriggerRunner.create_triggers yields to the loop between two).
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(run_to_end(trigger)))
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=25)
    stop.set()
    await dog
    await finisher

    assert all(len(events) == 1 and events[0]["event"] == "terminal" for events in results)
    assert {events[0]["batch"]["status"] for events in results} == {"completed"}
    assert sum(events[0]["polls"] for events in results) > triggers_count  # they really waited together
    assert len(lags) > 10
    assert max(lags) < 0.1, (
        f"event loop blocked for {max(lags):.3f}s at sample {lags.index(max(lags))}/{len(lags)}"
    )
    # one shared client for all of them, leased by many at once
    assert len(created) == 1
    assert max(len(seen) for seen in clients_seen) == 1
    assert max(sum(seen.values()) for seen in clients_seen) > MAX_CONCURRENT_POLLS
    assert _pool.shared_clients() == {}
