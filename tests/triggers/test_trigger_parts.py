"""
BatchTrigger for the parts of a split job: every part on its own schedule, one event once all have ended.

The emulator holds the batches; the trigger's clock moves only when it sleeps, and a script moves the
batches on as that clock passes given times, so parts end at different moments and nobody waits.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.exceptions import (
    BatchFailedError,
    BatchTimeoutError,
    InvalidInputError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.triggers import batch as trigger_module
from airflow_provider_llmbatch.triggers.batch import CLASSPATH, BatchTrigger
from tests.pollkit import START, batches_in, log_text, rebuild, run_to_end, scripted_clock, waits_on

pytestmark = pytest.mark.integration

# -- the serialized form -----------------------------------------------------------------------------

PARTS_KWARGS = {
    "conn_id": "llmbatch_dashscope",
    "batch_id": None,
    "batch_ids": ["batch_1", "batch_2", "batch_3"],
    "poll_interval": 5.0,
    "max_poll_interval": 60.0,
    "deadline": 1_800_000_123.5,
    "cancel_on_kill": False,
    "cancel_on_timeout": True,
    "max_consecutive_errors": 3,
}


def test_a_trigger_for_parts_serializes_its_batch_ids():
    classpath, kwargs = BatchTrigger(**PARTS_KWARGS).serialize()
    assert (classpath, kwargs) == (CLASSPATH, PARTS_KWARGS)
    assert rebuild(BatchTrigger(**PARTS_KWARGS)).serialize() == (CLASSPATH, PARTS_KWARGS)
    from airflow.serialization.serialized_objects import BaseSerialization

    restored = BaseSerialization.deserialize(BaseSerialization.serialize(kwargs))
    assert import_string(classpath)(**restored).serialize() == (classpath, kwargs)


@pytest.mark.parametrize("given", [{"batch_id": "batch_1"}, {"batch_ids": ["batch_1"]}])
def test_one_batch_serializes_as_before_parts(given):
    _, kwargs = BatchTrigger("c", **given).serialize()
    # Exactly the previous release's keys: a triggerer still running it can load the row.
    assert kwargs["batch_id"] == "batch_1"
    assert "batch_ids" not in kwargs
    assert set(kwargs) == {k for k in PARTS_KWARGS if k != "batch_ids"}


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"batch_id": "b1", "batch_ids": ["b2"]},
        {"batch_ids": []},
        {"batch_ids": "b1"},
        {"batch_ids": ["b1", "b1"]},
        {"batch_ids": ["b1", ""]},
        {"batch_ids": ["b1", None]},
        {"batch_id": ""},
    ],
)
def test_the_batches_to_wait_for_are_checked(given):
    with pytest.raises(InvalidInputError, match=r"batch_id|batch ids"):
        BatchTrigger("c", **given)


# -- one event, once every part has ended --------------------------------------------------------------


@pytest.fixture
def polled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Return the batch ids the trigger polls, in order."""
    seen: list[str] = []
    real = BatchHook.aget_batch

    async def recording(self: BatchHook, batch_id: str, **kwargs: Any) -> Batch:
        seen.append(batch_id)
        return await real(self, batch_id, **kwargs)

    monkeypatch.setattr(BatchHook, "aget_batch", recording)
    return seen


@pytest.mark.asyncio
async def test_one_event_once_every_part_has_ended(
    emulator, connect, make_batch, monkeypatch, polled, trigger_logs
):
    ids = batches_in(emulator, make_batch, "openai")
    emulator.force_status("openai", ids[0], "completed")
    clock = scripted_clock(emulator, "openai", [(200, ids[2], "completed"), (900, ids[1], "completed")])
    waits_on(clock, trigger_module, monkeypatch)
    trigger = BatchTrigger(connect("openai"), batch_ids=ids, poll_interval=30, max_poll_interval=120)

    events = await run_to_end(trigger)

    # The parts polled at once through one hook: its one lease of the shared session is given back.
    assert transport.shared_sessions() == {}
    assert len(events) == 1
    [event] = events
    assert event["event"] == "terminal"
    assert [b["batch_id"] for b in event["batches"]] == ids  # in the order given, not of ending
    assert [b["status"] for b in event["batches"]] == ["completed"] * 3
    assert event["batch_id"] == ids[0]
    assert event["batch"] == event["batches"][0]
    assert event["message"] == "all 3 batches ended"
    assert event["polls"] == len(polled)
    # Each part on its own schedule: the one that had ended is polled once, the last to end the most.
    assert polled.count(ids[0]) == 1
    assert polled.count(ids[1]) > polled.count(ids[2]) > 1
    assert clock.now >= START + 900  # not before the last part ended
    assert json.loads(json.dumps(event)) == event
    # One progress line for the job, none per part.
    logged = log_text(trigger_logs, "info")
    assert "3 of 3 batches ended; 9 completed, 0 failed of 9 requests" in logged
    assert "1 of 3 batches ended" in logged
    assert not any(f"Batch {batch_id}: status" in logged for batch_id in ids)


@pytest.mark.asyncio
async def test_a_failed_part_is_named_by_the_judged_outcome(emulator, connect, make_batch, monkeypatch):
    ids = batches_in(emulator, make_batch, "zhipu")
    plan = [(100, ids[0], "completed"), (300, ids[1], "failed"), (600, ids[2], "completed")]
    waits_on(scripted_clock(emulator, "zhipu", plan), trigger_module, monkeypatch)

    [event] = await run_to_end(BatchTrigger(connect("zhipu"), batch_ids=ids, poll_interval=30))

    assert event["event"] == "terminal"  # the wait ends with all of them, the failure among them
    assert [b["status"] for b in event["batches"]] == ["completed", "failed", "completed"]
    with pytest.raises(BatchFailedError, match=rf"part 2 of 3: batch {ids[1]} is failed") as info:
        waiting.complete({}, event, waiting.WaitSettings(), None)
    assert info.value.batch_id == ids[1]


@pytest.mark.asyncio
async def test_a_part_whose_polling_fails_ends_the_wait_of_all(
    emulator, connect, make_batch, fake_time, polled
):
    ids = batches_in(emulator, make_batch, "moonshot", count=2)
    ids.insert(1, "batch_missing")

    [event] = await run_to_end(BatchTrigger(connect("moonshot"), batch_ids=ids, poll_interval=30))

    assert event["event"] == "error"
    # The failure, once, under its own batch: the parts it stopped are not named as failing.
    assert event["message"].startswith("Polling batch batch_missing failed: NotFoundError")
    assert "; " not in event["message"]
    assert ids[0] not in event["message"]
    assert ids[2] not in event["message"]
    assert polled.count("batch_missing") == 1
    # The wait ended while the other parts still ran, and left them running.
    others = [event["batches"][0], event["batches"][2]]
    assert event["batches"][1] is None
    assert all(b is None or b["status"] == "in_progress" for b in others)  # polled, or not yet
    assert {emulator.batch("moonshot", i)["status"] for i in (ids[0], ids[2])} == {"in_progress"}
    assert emulator.stats("moonshot")["cancels"] == 0
    with pytest.raises(VendorAPIError, match="batch_missing"):
        waiting.complete({}, event, waiting.WaitSettings(), None, conn_id="c")


@pytest.mark.asyncio
async def test_the_deadline_cancels_the_parts_still_running(emulator, connect, make_batch, fake_time):
    ids = batches_in(emulator, make_batch, "dashscope")
    emulator.force_status("dashscope", ids[0], "completed")
    trigger = BatchTrigger(
        connect("dashscope"), batch_ids=ids, poll_interval=30, deadline=fake_time.now + 600
    )

    [event] = await run_to_end(trigger)

    assert event["event"] == "timeout"
    assert [b["status"] for b in event["batches"]] == ["completed", "cancelling", "cancelling"]
    assert [emulator.batch("dashscope", i)["status"] for i in ids] == [
        "completed",
        "cancelling",
        "cancelling",
    ]
    assert emulator.stats("dashscope")["cancels"] == 2
    assert event["message"] == "; ".join(
        f"Batch {i} did not finish before the deadline; cancel requested (status now cancelling)"
        for i in ids[1:]
    )
    assert fake_time.now == pytest.approx(trigger.deadline)
    with pytest.raises(BatchTimeoutError, match="did not finish before the deadline"):
        waiting.complete({}, event, waiting.WaitSettings(), None)


@pytest.mark.asyncio
@pytest.mark.parametrize("cancel_on_kill", [True, False])
async def test_on_kill_cancels_every_running_part(emulator, connect, make_batch, cancel_on_kill):
    ids = batches_in(emulator, make_batch, "openai")
    emulator.force_status("openai", ids[2], "completed")
    trigger = BatchTrigger(connect("openai"), batch_ids=ids, cancel_on_kill=cancel_on_kill)

    await trigger.on_kill()
    await trigger.cleanup()

    expected = ["cancelling", "cancelling"] if cancel_on_kill else ["in_progress", "in_progress"]
    assert [emulator.batch("openai", i)["status"] for i in ids] == [*expected, "completed"]
    assert emulator.stats("openai")["cancels"] == (2 if cancel_on_kill else 0)


@pytest.mark.asyncio
async def test_a_rebuilt_trigger_for_parts_ends_the_same(emulator, connect, make_batch, fake_time):
    ids = batches_in(emulator, make_batch, "zhipu")
    for batch_id in ids:
        emulator.force_status("zhipu", batch_id, "completed")
    trigger = BatchTrigger(connect("zhipu"), batch_ids=ids, deadline=fake_time.now + 3600)

    [first] = await run_to_end(trigger)
    [again] = await run_to_end(rebuild(trigger))

    assert first == again
    assert first["event"] == "terminal"


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3", True, None])
def test_max_consecutive_errors_is_checked_never_converted(bad):
    with pytest.raises(InvalidInputError, match="max_consecutive_errors must be a whole number >= 1"):
        BatchTrigger("c", batch_ids=["b1", "b2"], max_consecutive_errors=bad)
