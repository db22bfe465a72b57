"""
Waiting for the parts of a split job from a task: judged together, polled on the worker each on its own
schedule, or deferred to one trigger for all of them.
"""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchOutcomeError,
    BatchTimeoutError,
    LLMBatchError,
    TooManyFailedRequestsError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.outcomes import judge
from tests.pollkit import START, Clock, RecordingLog, XComTI, batches_in, scripted_clock, waits_on
from tests.test_waiting import wait

pytestmark = pytest.mark.integration


def part(batch_id: str, status: str = "completed", total: int = 10, failed: int = 0) -> dict[str, Any]:
    counts = {"total": total, "completed": total - failed, "failed": failed}
    return {"batch_id": batch_id, "status": status, "request_counts": counts}


def parts_event(*summaries: dict[str, Any]) -> dict[str, Any]:
    first = summaries[0]
    return {"event": "terminal", "batch_id": first["batch_id"], "batch": first, "batches": list(summaries)}


# -- judged together -------------------------------------------------------------------------------------


def test_parts_are_returned_and_pushed_as_a_list():
    context = {"ti": XComTI()}
    summaries = [part("b1"), part("b2"), part("b3", total=5)]
    result = waiting.complete(context, parts_event(*summaries), waiting.WaitSettings(), {"input_uri": "u"})
    assert result == {"input_uri": "u", "batch_ids": ["b1", "b2", "b3"], "batches": summaries}
    assert context["ti"].xcoms == {"batch_summaries": summaries}


@pytest.mark.parametrize(
    ("status", "error"),
    [("failed", BatchFailedError), ("expired", BatchExpiredError), ("cancelled", BatchCancelledError)],
)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_part_that_ended_badly_is_named(status, error, index):
    context = {"ti": XComTI()}
    summaries = [part(f"b{i + 1}") for i in range(3)]
    summaries[index] = part(f"b{index + 1}", status)
    with pytest.raises(error, match=rf"part {index + 1} of 3: batch b{index + 1} is {status}") as info:
        waiting.complete(context, parts_event(*summaries), waiting.WaitSettings(), None)
    assert info.value.batch_id == f"b{index + 1}"
    assert context["ti"].xcoms["batch_summaries"] == summaries  # pushed even on failure


def test_resubmitting_leaves_expired_and_cancelled_parts_to_a_later_round():
    summaries = [part("b1"), part("b2", "expired"), part("b3", "cancelled")]
    settings = waiting.WaitSettings(resubmitting=True)
    assert waiting.complete({}, parts_event(*summaries), settings, None)["batches"] == summaries
    with pytest.raises(BatchFailedError, match="part 1 of 3"):
        waiting.complete({}, parts_event(part("b1", "failed"), *summaries[1:]), settings, None)


def test_the_failed_fraction_is_judged_over_every_part():
    # 1, 3 and 0 failed of 10 each: 4 of 30 (13%) over all, though the second part alone has 30%.
    summaries = [part("b1", failed=1), part("b2", failed=3), part("b3")]
    with pytest.raises(TooManyFailedRequestsError):
        judge(summaries[1], max_failed_fraction=0.2)
    allowed = waiting.WaitSettings.checked(max_failed_fraction=0.2)
    assert waiting.complete({}, parts_event(*summaries), allowed, None)["batches"] == summaries

    strict = waiting.WaitSettings.checked(max_failed_fraction=0.1)
    with pytest.raises(
        TooManyFailedRequestsError, match=r"3 batches: 4 failed of 30 requests; 13\.33% failed"
    ):
        waiting.complete({}, parts_event(*summaries), strict, None)


@pytest.mark.parametrize(
    ("batches", "error", "match"),
    [
        ([part("b1"), None], LLMBatchError, "without every batch's id and status"),
        ([part("b1"), {"batch_id": "b2"}], LLMBatchError, "without every batch's id and status"),
        ([part("b1"), part("b2", "in_progress")], BatchOutcomeError, "part 2 of 2.*not a terminal status"),
        ([part("b1"), "b2"], LLMBatchError, "not a list of mappings"),
    ],
)
def test_a_terminal_event_must_carry_every_part_ended(batches, error, match):
    event = {"event": "terminal", "batch_id": "b1", "batch": part("b1"), "batches": batches}
    with pytest.raises(error, match=match):
        waiting.complete({}, event, waiting.WaitSettings(), None)


# -- a batch id is one batch -----------------------------------------------------------------------------


class PausedHook:
    """A vendor reporting a status nobody documents, for any batch; records what it is asked."""

    conn_id = "c"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def get_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        self.asked.append(batch_id)
        return Batch.model_validate({"id": batch_id, "status": "paused_by_vendor"})

    def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})


def test_one_batch_id_is_one_batch_never_its_characters(monkeypatch):
    # The signatures before parts took one id: a caller passing a str still waits for that batch.
    clock = waits_on(Clock(), waiting, monkeypatch)
    hook, settings = PausedHook(), waiting.WaitSettings.checked(timeout=300)
    event = waiting.poll_until_done(hook, "batch_abc", settings, clock.now + 300, RecordingLog())  # type: ignore[arg-type]
    assert set(hook.asked) == {"batch_abc"}
    assert event["batches"] == [event["batch"]]
    _, kwargs = settings.trigger("c", "batch_abc", clock.now + 300).serialize()
    assert kwargs["batch_id"] == "batch_abc"
    assert "batch_ids" not in kwargs


# -- on the worker, each part on its own schedule ------------------------------------------------------


@pytest.fixture
def polled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Return the batch ids the worker-side wait polls, in order."""
    seen: list[str] = []
    real = BatchHook.get_batch

    def recording(self: BatchHook, batch_id: str, **kwargs: Any) -> Batch:
        seen.append(batch_id)
        return real(self, batch_id, **kwargs)

    monkeypatch.setattr(BatchHook, "get_batch", recording)
    return seen


def _worker_clock(monkeypatch: pytest.MonkeyPatch, emulator: Emulator, vendor: str, plan: list[Any]) -> Clock:
    """Return the worker's clock, forcing the ``plan``'s statuses as it passes their times."""
    return waits_on(scripted_clock(emulator, vendor, plan), waiting, monkeypatch)


def test_the_worker_waits_for_every_part_on_its_own_schedule(
    emulator, connect, make_batch, monkeypatch, polled
):
    ids = batches_in(emulator, make_batch, "zhipu")
    emulator.force_status("zhipu", ids[0], "completed")
    plan = [(200, ids[2], "completed"), (900, ids[1], "completed")]
    clock = _worker_clock(monkeypatch, emulator, "zhipu", plan)
    log = RecordingLog()

    result = wait(connect("zhipu"), ids, log=log, poll_interval=30, max_poll_interval=120)

    assert result["batch_ids"] == ids
    assert [b["status"] for b in result["batches"]] == ["completed"] * 3
    assert result["reattached"] is False  # the extra keys travel through
    assert polled.count(ids[0]) == 1  # ended before the wait: polled once
    assert polled.count(ids[1]) > polled.count(ids[2]) > 1
    assert clock.now >= START + 900
    assert "3 of 3 batches ended; 9 completed, 0 failed of 9 requests" in log.text("info")
    assert not any(f"Batch {i}: status" in log.text() for i in ids)  # one line for the job


def test_the_worker_deadline_cancels_the_parts_still_running(emulator, connect, make_batch, monkeypatch):
    ids = batches_in(emulator, make_batch, "openai")
    emulator.force_status("openai", ids[1], "completed")
    clock = _worker_clock(monkeypatch, emulator, "openai", [])

    with pytest.raises(BatchTimeoutError, match=f"Batch {ids[0]} did not finish") as info:
        wait(connect("openai"), ids, timeout=900, max_poll_interval=300)

    assert f"Batch {ids[2]} did not finish" in str(info.value)
    assert [emulator.batch("openai", i)["status"] for i in ids] == ["cancelling", "completed", "cancelling"]
    assert emulator.stats("openai")["cancels"] == 2
    assert clock.now == pytest.approx(START + 900)


def test_a_part_whose_polling_fails_ends_the_worker_wait(emulator, connect, make_batch, monkeypatch, polled):
    ids = batches_in(emulator, make_batch, "moonshot")
    _worker_clock(monkeypatch, emulator, "moonshot", [])
    emulator.add_fault(FaultRule("503", vendor="moonshot", operation="get_batch", times=None))

    with pytest.raises(VendorAPIError, match="failed 3 times in a row") as info:
        wait(connect("moonshot"), ids, max_consecutive_errors=3)

    # The part whose polls failed three times in a row ends it; the message names that part only once.
    assert str(info.value).count("failed 3 times in a row") == 1
    assert len(polled) < 9
    assert emulator.stats("moonshot")["cancels"] == 0


# -- deferred to one trigger ---------------------------------------------------------------------------


def test_parts_defer_to_one_trigger(emulator, connect, make_batch, monkeypatch):
    ids = batches_in(emulator, make_batch, "dashscope")
    emulator.force_status("dashscope", ids[0], "completed")
    clock = _worker_clock(monkeypatch, emulator, "dashscope", [])

    with pytest.raises(TaskDeferred) as info:
        wait(connect("dashscope"), ids, deferrable=True, timeout=600)

    _, kwargs = info.value.trigger.serialize()
    assert (kwargs["batch_id"], kwargs["batch_ids"]) == (None, ids)
    assert kwargs["deadline"] == clock.now + 600
    assert info.value.kwargs == {"extra": {"reattached": False, "status": "x"}}


def test_parts_that_all_ended_are_judged_without_deferring(emulator, connect, make_batch):
    ids = batches_in(emulator, make_batch, "openai")
    for batch_id in ids:
        emulator.force_status("openai", batch_id, "completed")
    assert wait(connect("openai"), ids, deferrable=True)["batch_ids"] == ids
    emulator.force_status("openai", ids[1], "cancelled")
    with pytest.raises(BatchCancelledError, match="part 2 of 3"):
        wait(connect("openai"), ids, deferrable=True)
