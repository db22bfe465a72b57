"""
BatchTrigger: its serialized form, one event per run, and its waits on a clock the test controls.

The trigger is only the I/O around the poll state machine (``tests/test_polling*.py`` cover its
decisions); these tests speak HTTP to the emulator over loopback, or to a scripted hook where the
emulator cannot produce a case.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string

from airflow_provider_llmbatch.emulator import FaultRule
from airflow_provider_llmbatch.exceptions import NotFoundError, ServerError
from airflow_provider_llmbatch.polling import JITTER, scheduled_delay
from airflow_provider_llmbatch.triggers.batch import CLASSPATH, BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.pollkit import (
    FATAL_ERRORS,
    TERMINAL,
    TRANSIENT_ERRORS,
    ScriptedHook,
    error_id,
    log_text,
    rebuild,
    run_to_end,
)

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)


def scripted(answers: list[str | Exception], **kwargs: Any) -> tuple[BatchTrigger, ScriptedHook]:
    clock = kwargs.pop("clock", None)
    trigger = BatchTrigger("unused", "b1", **kwargs)
    hook = ScriptedHook(answers, clock)
    trigger._hook = hook  # type: ignore[assignment]
    return trigger, hook


# -- the serialized form -----------------------------------------------------------------------------

KWARGS = {
    "conn_id": "llmbatch_zhipu",
    "batch_id": "batch_1",
    "poll_interval": 5.0,
    "max_poll_interval": 60.0,
    "deadline": 1_800_000_123.5,
    "cancel_on_kill": False,
    "cancel_on_timeout": False,
    "max_consecutive_errors": 3,
}


def test_serialize_returns_exactly_the_constructor_kwargs():
    classpath, serialized = BatchTrigger(**KWARGS).serialize()
    assert classpath == CLASSPATH == "airflow_provider_llmbatch.triggers.batch.BatchTrigger"
    assert serialized == KWARGS
    assert all(v is None or isinstance(v, str | int | float | bool) for v in serialized.values())
    assert rebuild(BatchTrigger(**KWARGS)).serialize() == (classpath, KWARGS)


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


PREVIOUS_RELEASE = [
    # What the release before the redesign wrote to the trigger table (its serialize(), verbatim).
    {
        "conn_id": "llmbatch_openai",
        "batch_id": "batch_abc",
        "poll_interval": 30.0,
        "max_poll_interval": 600.0,
        "deadline": 1_800_604_800.0,
        "cancel_on_kill": True,
        "cancel_on_timeout": True,
        "max_consecutive_errors": 10,
    },
    {
        "conn_id": "c",
        "batch_id": "b",
        "poll_interval": 0.2,
        "max_poll_interval": 0.5,
        "deadline": None,
        "cancel_on_kill": False,
        "cancel_on_timeout": False,
        "max_consecutive_errors": 1,
    },
]


@pytest.mark.parametrize("stored", PREVIOUS_RELEASE)
def test_a_trigger_serialized_by_the_previous_release_still_loads(stored):
    trigger = import_string(CLASSPATH)(**json.loads(json.dumps(stored)))
    assert trigger.serialize() == (CLASSPATH, stored)


@pytest.mark.parametrize(
    "old_kwargs",
    [{"conn_id": "c", "batch_id": "b"}, {"conn_id": "c", "batch_id": "b", "poll_interval": 10}],
)
def test_kwargs_left_out_take_their_defaults(old_kwargs):
    _, kwargs = import_string(CLASSPATH)(**old_kwargs).serialize()
    assert kwargs.items() >= old_kwargs.items()
    assert set(kwargs) == set(KWARGS)


def test_airflow_serializer_round_trip():
    from airflow.serialization.serialized_objects import BaseSerialization

    classpath, kwargs = BatchTrigger("c", "b", deadline=1_800_000_000.0).serialize()
    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    assert import_string(classpath)(**restored).serialize() == (classpath, kwargs)


# -- one event per run ---------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("status", TERMINAL)
async def test_every_terminal_status(emulator, connect, make_batch, fake_time, vendor, status):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, status)
    events = await run_to_end(BatchTrigger(connect(vendor), batch_id, poll_interval=0.05))
    assert len(events) == 1
    event = events[0]
    assert event["event"] == "terminal"
    assert event["batch_id"] == event["batch"]["batch_id"] == batch_id
    assert event["batch"]["status"] == status
    assert event["polls"] == 1
    assert status in event["message"]
    assert json.loads(json.dumps(event)) == event


@pytest.mark.asyncio
@pytest.mark.parametrize("outcome", TERMINAL)
async def test_natural_endings_by_metadata(emulator, connect, make_batch, emulator_time, outcome):
    batch_id = make_batch("openai", metadata={"emulator_outcome": outcome})
    trigger = BatchTrigger(connect("openai"), batch_id, poll_interval=0.05, max_poll_interval=0.1)
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["terminal"]
    assert events[0]["batch"]["status"] == outcome
    if outcome == "completed":
        assert events[0]["batch"]["output_file_id"]
        assert events[0]["batch"]["request_counts"]["completed"] == 3


@pytest.mark.asyncio
async def test_run_yields_once_and_returns(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    trigger = BatchTrigger(connect("zhipu"), batch_id)
    agen = trigger.run()
    first = await agen.__anext__()
    assert first.payload["event"] == "terminal"
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()
    await trigger.cleanup()


# -- waits, on the controlled clock ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_first_poll_is_immediate_and_the_second_comes_soon(fake_time):
    trigger, hook = scripted(["in_progress", "completed"], poll_interval=30)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert fake_time.sleeps[0] == 0.0
    assert 30 * 0.25 * (1 - JITTER) <= fake_time.sleeps[1] <= 30 * 0.25 * (1 + JITTER)
    assert hook.count("get") == 2


@pytest.mark.asyncio
async def test_an_unknown_status_keeps_polling_until_the_deadline(fake_time, trigger_logs):
    trigger, hook = scripted(["paused_by_vendor"], poll_interval=30, deadline=fake_time.now + 600)
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["timeout"]
    assert hook.count("get") > 3
    assert hook.count("cancel") == 1
    assert events[0]["batch"]["status"] == "cancelling"
    assert "paused_by_vendor" in log_text(trigger_logs, "warning")


@pytest.mark.asyncio
async def test_waits_grow_to_the_cap_and_end_at_the_deadline(fake_time):
    deadline = fake_time.now + 86_400
    trigger, _ = scripted(["in_progress"], poll_interval=30, max_poll_interval=120, deadline=deadline)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    waits = fake_time.sleeps[1:]
    assert max(waits) < 120
    assert waits[0] <= 30 * 0.25 * (1 + JITTER)
    assert waits[-2] == pytest.approx(scheduled_delay(86_000, None, poll_interval=30, max_poll_interval=120))
    assert fake_time.now == pytest.approx(deadline)


@pytest.mark.asyncio
@pytest.mark.parametrize("slot_wait", [0.0, 45.0, 900.0])
async def test_the_wait_runs_from_when_the_poll_held_its_slot(fake_time, monkeypatch, slot_wait):
    from airflow_provider_llmbatch.triggers import batch as trigger_module

    sent: list[float] = []

    class Watched(trigger_module.Poller):
        def after(self, result: Any, *, sent_at: float, now: float) -> Any:
            sent.append(sent_at)
            return super().after(result, sent_at=sent_at, now=now)

    monkeypatch.setattr(trigger_module, "Poller", Watched)
    trigger, hook = scripted(["in_progress"] * 4 + ["completed"], clock=fake_time, poll_interval=30)
    hook.slot_wait = slot_wait
    await run_to_end(trigger)
    polled_at = [at for name, at in hook.calls if name == "get"]
    # Each poll is timed from when it held its slot, so queueing for one never shortens the next wait.
    assert sent == polled_at
    for before, after in itertools.pairwise(polled_at):
        assert after - before >= 30 * 0.25 * (1 - JITTER) + slot_wait


@pytest.mark.asyncio
async def test_a_slow_failed_poll_is_timed_from_when_it_was_sent(fake_time):
    # As on the worker: a poll that failed after 50 s was sent 50 s before its failure, and its error
    # delay (20 s here) has passed by then: the next poll starts at once.
    trigger, hook = scripted([ServerError("boom", status_code=503), "completed"], clock=fake_time)
    hook.poll_time = 50.0
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert fake_time.sleeps == [0.0, 0.0]


@pytest.mark.asyncio
async def test_the_deadline_cancels_the_batch(emulator, connect, make_batch, fake_time):
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
    assert emulator.stats("moonshot")["cancels"] == 1


@pytest.mark.asyncio
async def test_the_deadline_without_cancel_leaves_the_batch(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    trigger = BatchTrigger(
        connect("openai"), batch_id, poll_interval=30, deadline=fake_time.now + 600, cancel_on_timeout=False
    )
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    assert "left running" in events[0]["message"]
    assert emulator.batch("openai", batch_id)["status"] == "in_progress"
    assert emulator.stats("openai")["cancels"] == 0


@pytest.mark.asyncio
async def test_a_failed_cancel_is_reported(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    emulator.add_fault(FaultRule("503", vendor="zhipu", operation="cancel", times=None))
    trigger = BatchTrigger(connect("zhipu"), batch_id, deadline=fake_time.now + 60)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "timeout"
    assert events[0]["message"].endswith("the cancel request failed")


@pytest.mark.asyncio
async def test_a_terminal_batch_at_the_deadline_wins(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    events = await run_to_end(BatchTrigger(connect("zhipu"), batch_id, deadline=fake_time.now - 10))
    assert events[0]["event"] == "terminal"
    assert emulator.batch("zhipu", batch_id)["status"] == "completed"


# -- failed polls ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["503", "500", "429", "reset"])
async def test_transient_errors_recover(emulator, connect, make_batch, fake_time, kind, trigger_logs):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    emulator.add_fault(FaultRule(kind, vendor="openai", operation="get_batch", times=3))
    trigger = BatchTrigger(connect("openai"), batch_id, poll_interval=30, max_consecutive_errors=4)
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["terminal"]
    polls = events[0]["polls"]
    # aiohttp sends a GET again by itself when a kept-alive connection turns out to be closed.
    assert polls == 4 or (kind == "reset" and 2 <= polls <= 4)
    waits = fake_time.sleeps[1:]
    assert len(waits) == polls - 1
    assert waits == sorted(waits)  # the error delay doubles
    assert waits[0] >= 30 * 0.25  # never sooner than scheduled
    assert log_text(trigger_logs, "warning").count("will retry") == polls - 1


@pytest.mark.asyncio
async def test_a_persistent_outage_gives_a_bounded_error(emulator, connect, make_batch, fake_time):
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
    assert len(fake_time.sleeps) == 5  # the first (0 s) and four after failures


@pytest.mark.asyncio
async def test_the_hooks_own_retries_stay_off(emulator, connect, make_batch, fake_time):
    # The trigger owns the schedule: a connection's max_retries never multiplies a poll.
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "completed")
    emulator.add_fault(FaultRule("503", vendor="zhipu", operation="get_batch", times=1))
    trigger = BatchTrigger(connect("zhipu", "retrying_zhipu", max_retries=3), batch_id)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert events[0]["polls"] == 2
    assert emulator.stats("zhipu")["operations"]["get_batch"] == 2


@pytest.mark.asyncio
async def test_retry_after_is_honoured(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    emulator.add_fault(FaultRule("429_retry_after", vendor="openai", operation="get_batch", retry_after=42))
    trigger = BatchTrigger(connect("openai"), batch_id, poll_interval=1, max_poll_interval=300)
    events = await run_to_end(trigger)
    assert events[0]["event"] == "terminal"
    assert 42 <= fake_time.sleeps[1] <= 42 * (1 + JITTER)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "polls"),
    [*((e, 3) for e in TRANSIENT_ERRORS), *((e, 1) for e in FATAL_ERRORS)],
    ids=[*(error_id(e) for e in TRANSIENT_ERRORS), *(error_id(e) for e in FATAL_ERRORS)],
)
async def test_error_classes(fake_time, error, polls):
    trigger, hook = scripted([error], max_consecutive_errors=3)
    events = await run_to_end(trigger)
    assert [e["event"] for e in events] == ["error"]
    assert hook.count("get") == polls
    assert str(error) in events[0]["message"]


@pytest.mark.asyncio
async def test_not_found_fails_at_once(emulator, connect, fake_time):
    events = await run_to_end(BatchTrigger(connect("openai"), "batch_missing", max_consecutive_errors=10))
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["polls"] == 1
    assert fake_time.sleeps == [0.0]
    assert NotFoundError.__name__ in events[0]["message"]


@pytest.mark.asyncio
async def test_a_wrong_key_fails_at_once(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("moonshot")
    conn_id = connect("moonshot", "bad_key", key="sk-wrong-key-123")
    events = await run_to_end(BatchTrigger(conn_id, batch_id))
    assert events[0]["event"] == "error"
    assert "AuthenticationError" in events[0]["message"]
    assert "sk-wrong-key-123" not in json.dumps(events)


@pytest.mark.asyncio
async def test_a_missing_connection_is_an_error_event(emulator, fake_time):
    events = await run_to_end(BatchTrigger("no_such_connection_anywhere", "b1"))
    assert events[0]["event"] == "error"
    assert "no_such_connection_anywhere" in events[0]["message"]
