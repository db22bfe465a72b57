"""
Waiting from a task: the settings every wait argument goes through, the worker-side poll, the event.

``BatchSensor`` and ``CreateBatchOperator(wait_for_completion=True)`` wait through :mod:`waiting`: deferred to
``BatchTrigger``, or polled on the worker around the same state machine, both ending with the same event
that :func:`waiting.complete` judges. The sensor's and the operator's own behaviour is in their suites.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.checks import check_seconds
from airflow_provider_llmbatch.emulator import FaultRule
from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchTimeoutError,
    InvalidInputError,
    LLMBatchError,
    NotFoundError,
    TooManyFailedRequestsError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from tests.pollkit import Clock, RecordingLog, XComTI, waits_on

pytestmark = pytest.mark.integration

FAILURES = {"failed": BatchFailedError, "expired": BatchExpiredError, "cancelled": BatchCancelledError}


@pytest.fixture
def worker_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The worker-side wait's clock, moving only when it sleeps."""
    return waits_on(Clock(), waiting, monkeypatch)


def summary(status: str = "completed", total: int = 4, completed: int = 4, failed: int = 0) -> dict[str, Any]:
    return {
        "batch_id": "batch_x",
        "status": status,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
    }


def event(kind: str = "terminal", batch: dict[str, Any] | None = None, message: str = "m") -> dict[str, Any]:
    return {"event": kind, "batch_id": "batch_x", "batch": batch, "message": message, "polls": 3}


# -- every duration argument, refused the same way before anything is uploaded --------------------------

BAD_DURATIONS = [math.nan, math.inf, -5, 0, 1e30, "30", True]
DURATION_ARGUMENTS = [
    (CreateBatchOperator, {"task_id": "create", "input_file": "requests.jsonl"}, "poll_interval"),
    (CreateBatchOperator, {"task_id": "create", "input_file": "requests.jsonl"}, "max_poll_interval"),
    (CreateBatchOperator, {"task_id": "create", "input_file": "requests.jsonl"}, "timeout"),
    (BatchSensor, {"task_id": "wait", "batch_id": "batch_x"}, "poll_interval"),
    (BatchSensor, {"task_id": "wait", "batch_id": "batch_x"}, "max_poll_interval"),
    (BatchSensor, {"task_id": "wait", "batch_id": "batch_x"}, "timeout"),
    (BatchTrigger, {"conn_id": "c", "batch_id": "batch_x"}, "poll_interval"),
    (BatchTrigger, {"conn_id": "c", "batch_id": "batch_x"}, "max_poll_interval"),
]


@pytest.mark.parametrize("bad", BAD_DURATIONS, ids=repr)
@pytest.mark.parametrize(
    ("cls", "kwargs", "name"), DURATION_ARGUMENTS, ids=[f"{c.__name__}-{n}" for c, _, n in DURATION_ARGUMENTS]
)
def test_every_duration_argument_is_refused_the_same_way(emulator, connect, cls, kwargs, name, bad):
    conn_id = connect("openai")
    with pytest.raises(InvalidInputError) as expected:
        check_seconds(name, bad)
    if cls is not BatchTrigger:
        kwargs = {**kwargs, "conn_id": conn_id}
    with pytest.raises(InvalidInputError) as refused:
        cls(**kwargs, **{name: bad})
    assert str(refused.value) == str(expected.value)
    assert emulator.stats("openai")["operations"] == {}  # refused when the DAG is parsed: nothing sent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_failed_fraction": -0.1}, "max_failed_fraction must be from 0.0 to 1.0"),
        ({"max_failed_fraction": 1.5}, "max_failed_fraction"),
        ({"max_failed_fraction": math.nan}, "max_failed_fraction"),
        ({"max_failed_fraction": "0.1"}, "max_failed_fraction"),
        ({"max_failed_fraction": True}, "max_failed_fraction"),
        ({"max_consecutive_errors": 0}, "max_consecutive_errors must be a whole number >= 1"),
        ({"max_consecutive_errors": 2.5}, "max_consecutive_errors"),
        ({"max_consecutive_errors": True}, "max_consecutive_errors"),
    ],
)
def test_other_wait_arguments_are_checked(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        waiting.WaitSettings.checked(**kwargs)
    with pytest.raises(InvalidInputError, match=match):
        BatchSensor(task_id="wait", batch_id="b", **kwargs)


def test_settings_take_seconds_or_timedeltas():
    settings = waiting.WaitSettings.checked(
        poll_interval=timedelta(seconds=5), max_poll_interval=60, timeout=timedelta(hours=2)
    )
    assert (settings.poll_interval, settings.max_poll_interval, settings.timeout) == (5.0, 60.0, 7200.0)
    assert waiting.WaitSettings.checked() == waiting.WaitSettings()


# -- the event, judged ---------------------------------------------------------------------------------


def test_a_terminal_event_returns_and_pushes_the_summary():
    context = {"ti": XComTI()}
    result = waiting.complete(context, event(batch=summary()), waiting.WaitSettings(), {"extra": 1})
    assert result == {"extra": 1, **summary()}
    assert context["ti"].xcoms["batch_summary"] == summary()


@pytest.mark.parametrize(("status", "error"), FAILURES.items())
def test_a_terminal_event_raises_the_outcome(status, error):
    context = {"ti": XComTI()}
    with pytest.raises(error) as info:
        waiting.complete(context, event(batch=summary(status)), waiting.WaitSettings(), None)
    assert info.value.summary["batch_id"] == "batch_x"
    # Pushed even on failure, so the error file can still be found.
    assert context["ti"].xcoms["batch_summary"]["status"] == status


def test_the_failed_fraction_is_applied():
    partial = summary(total=10, completed=7, failed=3)
    with pytest.raises(TooManyFailedRequestsError):
        waiting.complete({}, event(batch=partial), waiting.WaitSettings(), None)
    allowed = waiting.WaitSettings.checked(max_failed_fraction=0.3)
    assert waiting.complete({}, event(batch=partial), allowed, None) == partial


def test_a_timeout_event_raises_batch_timeout():
    message = "Batch batch_x did not finish before the deadline"
    with pytest.raises(BatchTimeoutError, match="did not finish") as info:
        waiting.complete({}, event("timeout", summary("cancelling"), message), waiting.WaitSettings(), None)
    assert info.value.status == "timeout"
    assert info.value.batch_id == "batch_x"
    assert info.value.summary["status"] == "cancelling"


def test_an_error_event_raises_an_api_error_naming_the_connection():
    message = "Polling batch b failed 10 times in a row"
    with pytest.raises(VendorAPIError, match=r"failed 10 times in a row.*conn_id=c1"):
        waiting.complete({}, event("error", None, message), waiting.WaitSettings(), None, conn_id="c1")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (None, "without an event"),
        ("terminal", "not a mapping"),
        ({"event": "done"}, "unknown event"),
        ({}, "unknown event"),
        ({"event": "terminal", "batch": None}, "without every batch"),
        ({"event": "terminal", "batch": {"status": "completed"}}, "without every batch"),
        ({"event": "terminal", "batch": ["x"]}, "not a mapping"),
    ],
)
def test_malformed_events_are_rejected(bad, match):
    with pytest.raises(LLMBatchError, match=match):
        waiting.complete({}, bad, waiting.WaitSettings(), None)


def test_validate_event_normalises():
    assert waiting.validate_event({"event": "error", "message": 3}) == {
        "event": "error",
        "batch_id": "",
        "batch": None,
        "batches": [None],
        "message": "",
        "polls": None,
    }


# -- waiting on the worker ----------------------------------------------------------------------------


def wait(
    conn_id: str, batch_id: str | list[str], *, deferrable: bool = False, log: Any = None, **settings: Any
) -> dict[str, Any]:
    """Wait for a batch (or a job's parts) as a task does, with ``{"reattached": False, "status": "x"}``."""
    sensor = BatchSensor(task_id="wait", batch_id=batch_id, conn_id=conn_id)
    return waiting.wait_for_batch(
        {"ti": XComTI()},
        BatchHook(conn_id),
        batch_id,
        waiting.WaitSettings.checked(**settings),
        deferrable=deferrable,
        defer=sensor.defer,
        log=log or RecordingLog(),
        extra={"reattached": False, "status": "x"},
    )


def test_the_worker_wait_returns_the_summary_over_the_extra_keys(emulator, connect, make_batch, monkeypatch):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    monkeypatch.setattr(waiting, "sleep", lambda s: emulator.force_status("zhipu", batch_id, "completed"))
    result = wait(connect("zhipu"), batch_id)
    assert result["reattached"] is False
    assert result["status"] == "completed"  # the summary wins over the extra keys
    assert result["batch_id"] == batch_id


def test_the_worker_wait_times_out_and_cancels(emulator, connect, make_batch, worker_time):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    with pytest.raises(BatchTimeoutError, match="cancel requested") as info:
        wait(connect("moonshot"), batch_id, timeout=3600, max_poll_interval=300)
    assert info.value.summary["status"] in {"cancelling", "cancelled"}
    assert emulator.batch("moonshot", batch_id)["status"] in {"cancelling", "cancelled"}
    assert sum(worker_time.sleeps) == pytest.approx(3600)
    assert max(worker_time.sleeps) < 300


def test_the_worker_wait_follows_the_schedule(emulator, connect, make_batch, worker_time):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=2))
    with pytest.raises(BatchTimeoutError):
        wait(connect("openai"), batch_id, timeout=600, cancel_on_timeout=False)
    first, *after_errors = worker_time.sleeps[:4]
    assert first == 0.0  # the first poll at once
    assert after_errors[0] >= 7.5  # never sooner than scheduled after an error...
    assert after_errors[1] >= 2 * after_errors[0] / 1.1  # ...and doubling
    assert emulator.batch("openai", batch_id)["status"] == "in_progress"


def test_the_worker_wait_gives_up_after_consecutive_errors(emulator, connect, make_batch, worker_time):
    batch_id = make_batch("openai")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=None))
    with pytest.raises(VendorAPIError, match=r"failed 3 times in a row.*ServerError"):
        wait(connect("openai"), batch_id, max_consecutive_errors=3)
    assert emulator.stats("openai")["operations"]["get_batch"] == 3  # the hook's own retries stay off


class PausedHook:
    """A vendor reporting a status nobody documents (the emulator cannot)."""

    conn_id = "c"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        self.calls.append("get")
        return Batch.model_validate({"id": batch_id, "status": "paused_by_vendor"})

    def cancel_batch(self, batch_id: str) -> Batch:
        self.calls.append("cancel")
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})


def test_an_unknown_status_is_never_success_and_is_cancelled_at_the_deadline(worker_time):
    hook, settings = PausedHook(), waiting.WaitSettings.checked(timeout=900)
    deadline = worker_time.now + 900
    result = waiting.poll_until_done(hook, "b", settings, deadline, RecordingLog())  # type: ignore[arg-type]
    assert result["event"] == "timeout"
    assert result["message"].endswith("cancel requested (status now cancelling)")
    assert hook.calls.count("get") > 3
    assert hook.calls[-1] == "cancel"  # as the trigger does at its deadline


def test_not_found_fails_at_once_on_the_worker(emulator, connect, worker_time):
    with pytest.raises(VendorAPIError, match="NotFoundError"):
        wait(connect("openai"), "batch_nope")
    assert worker_time.sleeps == [0.0]


# -- deferring -----------------------------------------------------------------------------------------


def test_defers_with_the_extra_keys_and_a_deadline(emulator, connect, make_batch, worker_time):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    with pytest.raises(TaskDeferred) as info:
        wait(connect("moonshot"), batch_id, deferrable=True, timeout=600)
    deferred = info.value
    assert deferred.kwargs == {"extra": {"reattached": False, "status": "x"}}
    assert deferred.trigger.deadline == worker_time.now + 600
    assert deferred.timeout == timedelta(seconds=600 + waiting.DEFER_TIMEOUT_MARGIN)


def test_a_finished_batch_is_judged_without_deferring(emulator, connect, make_batch):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    assert wait(connect("openai"), batch_id, deferrable=True)["status"] == "completed"
    emulator.force_status("openai", batch_id, "expired")
    with pytest.raises(BatchExpiredError):
        wait(connect("openai"), batch_id, deferrable=True)


def test_a_transient_error_before_deferring_still_defers(emulator, connect, make_batch):
    batch_id = make_batch("openai")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=None))
    with pytest.raises(TaskDeferred):
        wait(connect("openai"), batch_id, deferrable=True)


def test_a_missing_batch_fails_before_deferring(emulator, connect):
    with pytest.raises(NotFoundError):
        wait(connect("openai"), "batch_nope", deferrable=True)


def test_cancel_is_best_effort(emulator, connect, make_batch):
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "in_progress")
    emulator.add_fault(FaultRule("503", vendor="dashscope", operation="cancel", times=None))
    log = RecordingLog()
    conn_id = connect("dashscope")
    assert waiting.cancel(BatchHook(conn_id), batch_id, "the task was killed", log) is None
    assert "Could not cancel batch" in log.text("warning")
    emulator.clear_faults()
    emulator.force_status("dashscope", batch_id, "completed")
    # A batch that has ended is left as it is.
    assert waiting.cancel(BatchHook(conn_id), batch_id, "the task was killed", log)["status"] == "completed"
    assert emulator.stats("dashscope")["cancels"] == 0
