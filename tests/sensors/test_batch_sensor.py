from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk import BaseOperator, PokeReturnValue
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch.emulator import FaultRule
from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchTimeoutError,
    LLMBatchError,
    NotFoundError,
    ServerError,
    TooManyFailedRequestsError,
    VendorAPIError,
)
from airflow_provider_llmbatch.links.batch import BatchConsoleLink
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.sensors import batch as sensor_module
from airflow_provider_llmbatch.sensors.batch import (
    DEFAULT_TIMEOUT,
    DEFER_TIMEOUT_MARGIN,
    BatchSensor,
    BatchWaitMixin,
    validate_event,
)
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
FAILURES = {"failed": BatchFailedError, "expired": BatchExpiredError, "cancelled": BatchCancelledError}


class FakeTI:
    def __init__(self) -> None:
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        json.dumps(value)  # XCom values must serialize
        self.xcoms[key] = value


class FakeTime:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(sensor_module, "clock", fake.clock)
    monkeypatch.setattr(sensor_module, "sleep", fake.sleep)
    return fake


@pytest.fixture
def short_sleep(monkeypatch) -> None:
    import time

    monkeypatch.setattr(sensor_module, "sleep", lambda s: time.sleep(min(s, 0.02)))


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": FakeTI()}


def summary(status: str = "completed", total: int = 4, completed: int = 4, failed: int = 0) -> dict[str, Any]:
    return {
        "batch_id": "batch_x",
        "status": status,
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "output_file_id": "file-out",
        "error_file_id": "file-err" if failed else None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "created_at": None,
        "finished_at": None,
        "errors": [],
    }


def event(kind: str = "terminal", batch: dict[str, Any] | None = None, message: str = "m") -> dict[str, Any]:
    return {"event": kind, "batch": batch, "message": message, "polls": 3}


def sensor(**kwargs: Any) -> BatchSensor:
    kwargs.setdefault("task_id", "wait")
    kwargs.setdefault("batch_id", "batch_x")
    return BatchSensor(**kwargs)


# -- construction ------------------------------------------------------------------------------------


def test_defaults():
    s = sensor()
    assert s.deferrable is True
    assert s.conn_id == "llmbatch_default"
    assert s.poll_interval == 30.0
    assert s.max_poll_interval == 600.0
    assert s.timeout == DEFAULT_TIMEOUT == 7 * 24 * 3600
    assert s.max_failed_fraction == 0.0
    assert s.cancel_on_timeout is True
    assert s.cancel_on_kill is True
    assert set(s.template_fields) == {"batch_id", "conn_id"}
    assert any(isinstance(link, BatchConsoleLink) for link in s.operator_extra_links)


def test_timedelta_timeout():
    assert sensor(timeout=timedelta(hours=2)).timeout == 7200


@pytest.mark.parametrize("fraction", [-0.1, 1.1, float("nan")])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="max_failed_fraction"):
        sensor(max_failed_fraction=fraction)


@pytest.mark.parametrize("batch_id", ["", "  ", None, 42])
def test_empty_batch_id_after_rendering(batch_id, context):
    with pytest.raises(LLMBatchError, match="batch_id"):
        sensor(batch_id=batch_id).execute(context)


# -- execute_complete --------------------------------------------------------------------------------


def test_complete_returns_and_pushes_the_summary(context):
    result = sensor().execute_complete(context, event(batch=summary()))
    assert result == summary()
    assert result["output_file_id"] == "file-out"
    assert "error_file_id" in result
    assert context["ti"].xcoms["batch_summary"] == summary()


@pytest.mark.parametrize(("status", "error"), FAILURES.items())
def test_complete_raises_the_outcome(context, status, error):
    with pytest.raises(error) as info:
        sensor().execute_complete(context, event(batch=summary(status)))
    assert info.value.summary["batch_id"] == "batch_x"
    # pushed even on failure, so the error file can still be found
    assert context["ti"].xcoms["batch_summary"]["status"] == status


def test_complete_applies_the_failed_fraction(context):
    partial = summary(total=10, completed=7, failed=3)
    with pytest.raises(TooManyFailedRequestsError):
        sensor().execute_complete(context, event(batch=partial))
    assert sensor(max_failed_fraction=0.3).execute_complete(context, event(batch=partial)) == partial


def test_timeout_event_raises_batch_timeout(context):
    with pytest.raises(BatchTimeoutError, match="did not finish") as info:
        sensor().execute_complete(
            context,
            event("timeout", summary("cancelling"), "Batch batch_x did not finish before the deadline"),
        )
    assert info.value.status == "timeout"
    assert info.value.batch_id == "batch_x"


def test_error_event_raises_an_api_error(context):
    with pytest.raises(VendorAPIError, match="failed 10 times in a row"):
        sensor().execute_complete(context, event("error", None, "Polling batch b failed 10 times in a row"))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (None, "without an event"),
        ("terminal", "not a mapping"),
        ({"event": "done"}, "unknown event"),
        ({}, "unknown event"),
        ({"event": "terminal", "batch": None}, "without the batch"),
        ({"event": "terminal", "batch": {"status": "completed"}}, "without the batch"),
        ({"event": "terminal", "batch": ["x"]}, "not a mapping"),
    ],
)
def test_malformed_events_are_rejected(context, bad, match):
    with pytest.raises(LLMBatchError, match=match):
        sensor().execute_complete(context, bad)


def test_validate_event_normalises():
    assert validate_event({"event": "error", "message": 3}) == {
        "event": "error",
        "batch": None,
        "message": "",
        "polls": None,
    }


# -- deferrable --------------------------------------------------------------------------------------


def test_defers_to_the_trigger(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    s = sensor(
        batch_id=batch_id,
        conn_id=connect("zhipu"),
        timeout=3600,
        poll_interval=10,
        max_poll_interval=60,
        cancel_on_kill=False,
    )
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)
    deferred = info.value
    assert deferred.method_name == "execute_complete"
    assert deferred.timeout == timedelta(seconds=3600 + DEFER_TIMEOUT_MARGIN)
    assert deferred.kwargs is None
    assert isinstance(deferred.trigger, BatchTrigger)
    _, kwargs = deferred.trigger.serialize()
    assert kwargs == {
        "conn_id": "wait_zhipu",
        "batch_id": batch_id,
        "poll_interval": 10.0,
        "max_poll_interval": 60.0,
        "deadline": fake_time.now + 3600,
        "cancel_on_kill": False,
        "cancel_on_timeout": True,
        "max_consecutive_errors": 10,
    }
    # the link's keys are pushed before deferring
    assert context["ti"].xcoms["batch_id"] == batch_id
    assert context["ti"].xcoms["conn_type"] == "llmbatch_zhipu"
    assert emulator.api_key not in json.dumps(kwargs)


def test_a_finished_batch_is_judged_without_deferring(emulator, connect, make_batch, context):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    result = sensor(batch_id=batch_id, conn_id=connect("openai")).execute(context)
    assert result["status"] == "completed"
    assert result["batch_id"] == batch_id


def test_a_failed_batch_fails_without_deferring(emulator, connect, make_batch, context):
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "expired")
    with pytest.raises(BatchExpiredError):
        sensor(batch_id=batch_id, conn_id=connect("dashscope")).execute(context)


def test_a_transient_error_before_deferring_still_defers(emulator, connect, make_batch, context):
    batch_id = make_batch("openai")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=1))
    with pytest.raises(TaskDeferred):
        sensor(batch_id=batch_id, conn_id=connect("openai")).execute(context)


def test_a_missing_batch_fails_before_deferring(emulator, connect, context):
    with pytest.raises(NotFoundError):
        sensor(batch_id="batch_nope", conn_id=connect("openai")).execute(context)


# -- poke mode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_poke_mode_completes(emulator, connect, make_batch, short_sleep, context, vendor):
    batch_id = make_batch(vendor)
    s = sensor(batch_id=batch_id, conn_id=connect(vendor), deferrable=False, poll_interval=0.05)
    result = s.execute(context)
    assert result["status"] == "completed"
    assert result["request_counts"]["completed"] == 3
    assert result["output_file_id"]
    assert context["ti"].xcoms["batch_summary"] == result


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("status", "error"), FAILURES.items())
def test_poke_mode_failures(emulator, connect, make_batch, fake_time, context, vendor, status, error):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, status)
    with pytest.raises(error):
        sensor(batch_id=batch_id, conn_id=connect(vendor), deferrable=False).execute(context)


def test_poke_mode_failed_requests(emulator, connect, tmp_path, short_sleep, context):
    from airflow_provider_llmbatch.hooks.batch import BatchHook

    path = tmp_path / "mixed.jsonl"
    lines = [
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": []},
        }
        for cid in ("ok-1", "ok-2", "fail-1", "ok-3")
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    conn_id = connect("openai")
    with BatchHook(conn_id) as hook:
        batch_id = hook.create_batch(input_file_id=hook.upload_file(str(path)).id).id
    with pytest.raises(TooManyFailedRequestsError, match="1 failed of 4"):
        sensor(batch_id=batch_id, conn_id=conn_id, deferrable=False, poll_interval=0.05).execute(context)
    result = sensor(batch_id=batch_id, conn_id=conn_id, deferrable=False, max_failed_fraction=0.25).execute(
        context
    )
    assert result["error_file_id"]


def test_poke_mode_timeout_cancels(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    s = sensor(batch_id=batch_id, conn_id=connect("moonshot"), deferrable=False, timeout=3600)
    with pytest.raises(BatchTimeoutError, match="cancel requested") as info:
        s.execute(context)
    assert info.value.summary["status"] in {"cancelling", "cancelled"}
    assert emulator.batch("moonshot", batch_id)["status"] in {"cancelling", "cancelled"}
    assert sum(fake_time.sleeps) == pytest.approx(3600)
    assert max(fake_time.sleeps) <= s.max_poll_interval


def test_poke_mode_timeout_without_cancel(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    s = sensor(
        batch_id=batch_id, conn_id=connect("zhipu"), deferrable=False, timeout=600, cancel_on_timeout=False
    )
    with pytest.raises(BatchTimeoutError, match="left running"):
        s.execute(context)
    assert emulator.batch("zhipu", batch_id)["status"] == "in_progress"


def test_poke_mode_recovers_from_transient_errors(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "completed")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=3))
    s = sensor(batch_id=batch_id, conn_id=connect("openai"), deferrable=False, max_consecutive_errors=4)
    assert s.execute(context)["status"] == "completed"
    assert len(fake_time.sleeps) == 3


def test_poke_mode_gives_up_after_consecutive_errors(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("openai")
    emulator.add_fault(FaultRule("503", vendor="openai", operation="get_batch", times=None))
    s = sensor(batch_id=batch_id, conn_id=connect("openai"), deferrable=False, max_consecutive_errors=3)
    with pytest.raises(ServerError):
        s.execute(context)
    assert len(fake_time.sleeps) == 2


def test_on_kill_cancels_the_polled_batch(emulator, connect, make_batch, fake_time, context):
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "in_progress")
    s = sensor(
        batch_id=batch_id, conn_id=connect("dashscope"), deferrable=False, timeout=60, cancel_on_timeout=False
    )
    with pytest.raises(BatchTimeoutError):
        s.execute(context)
    assert emulator.batch("dashscope", batch_id)["status"] == "in_progress"
    s.on_kill()
    assert emulator.batch("dashscope", batch_id)["status"] in {"cancelling", "cancelled"}


def test_reschedule_mode_pokes_once(emulator, connect, make_batch, context):
    batch_id = make_batch("openai")
    emulator.force_status("openai", batch_id, "in_progress")
    s = sensor(batch_id=batch_id, conn_id=connect("openai"), deferrable=False, mode="reschedule")
    assert s.poke(context) is False
    emulator.force_status("openai", batch_id, "completed")
    done = s.poke(context)
    assert isinstance(done, PokeReturnValue)
    assert done.xcom_value["status"] == "completed"
    emulator.force_status("openai", batch_id, "failed")
    with pytest.raises(BatchFailedError):
        s.poke(context)


# -- the mixin as an operator uses it ----------------------------------------------------------------


class WaitingOperator(BatchWaitMixin, BaseOperator):
    def __init__(self, *, conn_id: str, deferrable: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.poll_interval = 0.05
        self.max_poll_interval = 0.1
        self.timeout = 600.0
        self.max_failed_fraction = 0.0

    def execute(self, context: Any) -> Any:
        return self._wait_for_batch(context, context["batch_id"], extra={"reattached": False, "status": "x"})


def test_mixin_waits_on_the_worker(emulator, connect, make_batch, short_sleep):
    batch_id = make_batch("zhipu")
    op = WaitingOperator(task_id="create", conn_id=connect("zhipu"), deferrable=False)
    result = op.execute({"batch_id": batch_id, "ti": FakeTI()})
    assert result["reattached"] is False
    assert result["status"] == "completed"  # the summary wins over the extra keys
    assert result["batch_id"] == batch_id


def test_mixin_defers_with_its_extra_keys(emulator, connect, make_batch, fake_time):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    op = WaitingOperator(task_id="create", conn_id=connect("moonshot"), deferrable=True)
    with pytest.raises(TaskDeferred) as info:
        op.execute({"batch_id": batch_id})
    assert info.value.kwargs == {"extra": {"reattached": False, "status": "x"}}
    assert info.value.trigger.deadline == fake_time.now + 600
    resumed = WaitingOperator(task_id="create", conn_id="wait_moonshot", deferrable=True)
    result = resumed.execute_complete({}, event(batch=summary()), **info.value.kwargs)
    assert result["reattached"] is False
    assert result["status"] == "completed"


class ScriptedSyncHook:
    def __init__(self, status: str) -> None:
        self.status = status
        self.calls: list[str] = []

    def get_batch(self, batch_id: str) -> Batch:
        self.calls.append("get")
        return Batch.model_validate({"id": batch_id, "status": self.status})

    def cancel_batch(self, batch_id: str) -> Batch:
        self.calls.append("cancel")
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})


def test_poke_mode_unknown_status_is_never_success(fake_time, context):
    s = sensor(deferrable=False, timeout=900)
    hook = ScriptedSyncHook("paused_by_vendor")
    s._wait_hook = hook
    with pytest.raises(BatchTimeoutError):
        s._wait_for_batch(context, "batch_x")
    assert hook.calls.count("get") > 3
    assert hook.calls[-1] == "cancel"


def test_poke_mode_not_found_fails_at_once(emulator, connect, fake_time, context):
    with pytest.raises(NotFoundError):
        sensor(batch_id="batch_nope", conn_id=connect("openai"), deferrable=False).execute(context)
    assert fake_time.sleeps == []
