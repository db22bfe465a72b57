"""
BatchSensor: its arguments, deferring to the trigger, polling on the worker, reschedule mode, on_kill.

How a wait decides and judges is :mod:`waiting`'s and the poll state machine's (``tests/test_waiting.py``,
``tests/test_polling*.py``); here the sensor is run as a task would run it, against the emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk import PokeReturnValue, conf
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchTimeoutError,
    InvalidInputError,
    TooManyFailedRequestsError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import BatchConsoleLink
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.pollkit import Clock, XComTI, batches_in, waits_on

pytestmark = pytest.mark.integration

VENDORS = list(REGISTRY)
FAILURES = {"failed": BatchFailedError, "expired": BatchExpiredError, "cancelled": BatchCancelledError}


@pytest.fixture
def worker_time(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The worker-side wait's clock, moving only when it sleeps."""
    return waits_on(Clock(), waiting, monkeypatch)


@pytest.fixture
def emulator_time(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The worker's clock, and the emulator's moving with it: batches run their course, nobody waits."""
    return waits_on(Clock(on_sleep=emulator.advance_clock), waiting, monkeypatch)


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": XComTI()}


def sensor(**kwargs: Any) -> BatchSensor:
    kwargs.setdefault("task_id", "wait")
    kwargs.setdefault("batch_id", "batch_x")
    return BatchSensor(**kwargs)


# -- arguments -------------------------------------------------------------------------------------------


def test_defaults():
    s = sensor()
    assert s.deferrable is conf.getboolean("operators", "default_deferrable", fallback=False)
    assert s.conn_id == "llmbatch_default"
    assert s.wait_settings == waiting.WaitSettings()
    assert s.wait_settings.timeout == waiting.DEFAULT_TIMEOUT == 7 * 24 * 3600
    assert (s.poke_interval, s.timeout) == (30.0, waiting.DEFAULT_TIMEOUT)
    assert set(s.template_fields) == {"batch_id", "conn_id"}
    assert any(isinstance(link, BatchConsoleLink) for link in s.operator_extra_links)


def test_deferrable_follows_the_default_deferrable_setting():
    # The default is read when the module is imported, as Airflow's own operators read it.
    script = (
        "from airflow_provider_llmbatch.sensors.batch import BatchSensor\n"
        "from airflow_provider_llmbatch.operators.batch import CreateBatchOperator\n"
        "print(BatchSensor(task_id='w', batch_id='b').deferrable,"
        " CreateBatchOperator(task_id='c', input_file='x').deferrable)\n"
    )
    for setting, expected in (("True", "True True"), ("False", "False False")):
        env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": setting}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert out.stdout.strip().splitlines()[-1] == expected, out.stderr[-2000:]


def test_timedelta_timeout():
    s = sensor(timeout=timedelta(hours=2))
    assert s.wait_settings.timeout == s.timeout == 7200


@pytest.mark.parametrize("batch_id", ["", "  ", None, 42])
def test_an_empty_batch_id_after_rendering_is_refused(batch_id, context):
    with pytest.raises(InvalidInputError, match="batch_id"):
        sensor(batch_id=batch_id).execute(context)


# -- deferrable -----------------------------------------------------------------------------------------


def test_defers_to_the_trigger(emulator, connect, make_batch, worker_time, context):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    s = sensor(
        batch_id=batch_id,
        conn_id=connect("zhipu"),
        deferrable=True,
        timeout=3600,
        poll_interval=10,
        max_poll_interval=60,
        cancel_on_kill=False,
    )
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)
    deferred = info.value
    assert deferred.method_name == "execute_complete"
    assert deferred.timeout == timedelta(seconds=3600 + waiting.DEFER_TIMEOUT_MARGIN)
    assert deferred.kwargs is None
    assert isinstance(deferred.trigger, BatchTrigger)
    _, kwargs = deferred.trigger.serialize()
    assert kwargs == {
        "conn_id": "wait_zhipu",
        "batch_id": batch_id,
        "poll_interval": 10.0,
        "max_poll_interval": 60.0,
        "deadline": worker_time.now + 3600,
        "cancel_on_kill": False,
        "cancel_on_timeout": True,
        "max_consecutive_errors": 10,
    }
    # The link's keys are pushed before deferring.
    assert context["ti"].xcoms["batch_id"] == batch_id
    assert context["ti"].xcoms["conn_type"] == "llmbatch_zhipu"
    assert emulator.api_key not in json.dumps(kwargs)


@pytest.mark.parametrize(("status", "error"), [("completed", None), *FAILURES.items()])
def test_execute_complete_judges_the_event(context, status, error):
    counts = {"total": 2, "completed": 2, "failed": 0}
    summary = {"batch_id": "batch_x", "status": status, "request_counts": counts}
    event = {"event": "terminal", "batch": summary, "message": "", "polls": 2}
    if error is None:
        assert sensor().execute_complete(context, event) == summary
    else:
        with pytest.raises(error):
            sensor().execute_complete(context, event)
    assert context["ti"].xcoms["batch_summary"] == summary


# -- polling on the worker ------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_poke_mode_completes(emulator, connect, make_batch, emulator_time, context, vendor):
    batch_id = make_batch(vendor)
    s = sensor(batch_id=batch_id, conn_id=connect(vendor), deferrable=False, poll_interval=0.05)
    result = s.execute(context)
    assert result["status"] == "completed"
    assert result["request_counts"]["completed"] == 3
    assert result["output_file_id"]
    assert context["ti"].xcoms["batch_summary"] == result


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("status", "error"), FAILURES.items())
def test_poke_mode_failures(emulator, connect, make_batch, worker_time, context, vendor, status, error):
    batch_id = make_batch(vendor)
    emulator.force_status(vendor, batch_id, status)
    with pytest.raises(error):
        sensor(batch_id=batch_id, conn_id=connect(vendor), deferrable=False).execute(context)


def test_poke_mode_failed_requests(emulator, connect, tmp_path, emulator_time, context):
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
    allowed = sensor(batch_id=batch_id, conn_id=conn_id, deferrable=False, max_failed_fraction=0.25)
    assert allowed.execute(context)["error_file_id"]


def test_poke_mode_timeout_cancels(emulator, connect, make_batch, worker_time, context):
    batch_id = make_batch("moonshot")
    emulator.force_status("moonshot", batch_id, "in_progress")
    s = sensor(batch_id=batch_id, conn_id=connect("moonshot"), deferrable=False, timeout=3600)
    with pytest.raises(BatchTimeoutError, match="cancel requested") as info:
        s.execute(context)
    assert info.value.summary["status"] in {"cancelling", "cancelled"}
    assert emulator.batch("moonshot", batch_id)["status"] in {"cancelling", "cancelled"}
    assert sum(worker_time.sleeps) == pytest.approx(3600)
    assert max(worker_time.sleeps) < s.wait_settings.max_poll_interval


def test_poke_mode_timeout_without_cancel(emulator, connect, make_batch, worker_time, context):
    batch_id = make_batch("zhipu")
    emulator.force_status("zhipu", batch_id, "in_progress")
    s = sensor(
        batch_id=batch_id, conn_id=connect("zhipu"), deferrable=False, timeout=600, cancel_on_timeout=False
    )
    with pytest.raises(BatchTimeoutError, match="left running"):
        s.execute(context)
    assert emulator.batch("zhipu", batch_id)["status"] == "in_progress"


def test_on_kill_cancels_the_polled_batch(emulator, connect, make_batch, worker_time, context):
    batch_id = make_batch("dashscope")
    emulator.force_status("dashscope", batch_id, "in_progress")
    conn_id = connect("dashscope")
    s = sensor(batch_id=batch_id, conn_id=conn_id, deferrable=False, timeout=60, cancel_on_timeout=False)
    with pytest.raises(BatchTimeoutError):
        s.execute(context)
    assert emulator.batch("dashscope", batch_id)["status"] == "in_progress"
    s.on_kill()
    assert emulator.batch("dashscope", batch_id)["status"] in {"cancelling", "cancelled"}

    kept = sensor(batch_id=batch_id, conn_id=conn_id, deferrable=False, timeout=60, cancel_on_kill=False)
    kept.on_kill()  # nothing polled yet, and cancel_on_kill=False: nothing to do
    sensor(batch_id=batch_id, conn_id=conn_id).on_kill()
    assert emulator.stats("dashscope")["cancels"] == 1


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


# -- the parts of a split job ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch_id",
    [[], ["batch_1", ""], ["batch_1", 7], ["batch_1", " batch_1"], "['batch_1', 'batch_2']", ' ["batch_1"]'],
)
def test_a_bad_list_of_batch_ids_is_refused(batch_id, context):
    with pytest.raises(InvalidInputError, match="batch_id"):
        sensor(batch_id=batch_id).execute(context)
    assert context["ti"].xcoms == {}


def test_a_list_defers_to_one_trigger(emulator, connect, make_batch, worker_time, context):
    ids = batches_in(emulator, make_batch, "zhipu")
    s = sensor(batch_id=ids, conn_id=connect("zhipu"), deferrable=True, timeout=3600)
    with pytest.raises(TaskDeferred) as info:
        s.execute(context)
    _, kwargs = info.value.trigger.serialize()
    assert (kwargs["batch_id"], kwargs["batch_ids"]) == (None, ids)
    assert kwargs["deadline"] == worker_time.now + 3600
    assert context["ti"].xcoms["batch_id"] == ids[0]  # the console link shows the first part

    summaries = [
        {"batch_id": i, "status": "completed", "request_counts": {"total": 3, "completed": 3, "failed": 0}}
        for i in ids
    ]
    event = {"event": "terminal", "batch_id": ids[0], "batch": summaries[0], "batches": summaries}
    assert s.execute_complete(context, event) == {"batch_ids": ids, "batches": summaries}
    assert context["ti"].xcoms["batch_summaries"] == summaries


def test_a_list_of_ended_batches_is_judged_without_deferring(emulator, connect, make_batch, context):
    ids = batches_in(emulator, make_batch, "openai", "completed")
    result = sensor(batch_id=ids, conn_id=connect("openai"), deferrable=True).execute(context)
    assert result["batch_ids"] == ids
    assert [b["status"] for b in result["batches"]] == ["completed"] * 3
    emulator.force_status("openai", ids[2], "expired")
    with pytest.raises(BatchExpiredError, match="part 3 of 3"):
        sensor(batch_id=ids, conn_id=connect("openai"), deferrable=True).execute(context)


def test_poke_mode_waits_for_every_batch_of_a_list(emulator, connect, make_batch, emulator_time, context):
    ids = [make_batch("dashscope") for _ in range(3)]
    s = sensor(batch_id=ids, conn_id=connect("dashscope"), deferrable=False, poll_interval=0.05)
    result = s.execute(context)
    assert [b["batch_id"] for b in result["batches"]] == ids
    assert [b["status"] for b in result["batches"]] == ["completed"] * 3
    assert context["ti"].xcoms["batch_summaries"] == result["batches"]
    assert "batch_summary" not in context["ti"].xcoms


def test_on_kill_cancels_every_polled_batch_of_a_list(emulator, connect, make_batch, worker_time, context):
    ids = batches_in(emulator, make_batch, "moonshot")
    emulator.force_status("moonshot", ids[1], "completed")
    s = sensor(
        batch_id=ids, conn_id=connect("moonshot"), deferrable=False, timeout=60, cancel_on_timeout=False
    )
    with pytest.raises(BatchTimeoutError):
        s.execute(context)
    s.on_kill()
    assert [emulator.batch("moonshot", i)["status"] for i in ids] == ["cancelling", "completed", "cancelling"]


def test_reschedule_mode_pokes_every_batch_of_a_list(emulator, connect, make_batch, context):
    ids = batches_in(emulator, make_batch, "openai")
    s = sensor(batch_id=ids, conn_id=connect("openai"), deferrable=False, mode="reschedule")
    emulator.force_status("openai", ids[0], "completed")
    emulator.force_status("openai", ids[2], "completed")
    assert s.poke(context) is False  # one part still runs
    emulator.force_status("openai", ids[1], "completed")
    done = s.poke(context)
    assert isinstance(done, PokeReturnValue)
    assert done.xcom_value["batch_ids"] == ids
    emulator.force_status("openai", ids[1], "failed")
    with pytest.raises(BatchFailedError, match="part 2 of 3") as info:
        s.poke(context)
    assert info.value.batch_id == ids[1]


@pytest.mark.parametrize("status", ["expired", "cancelled"])
def test_an_unrun_part_is_left_to_a_resubmission_when_one_is_expected(
    emulator, connect, make_batch, context, status
):
    ids = batches_in(emulator, make_batch, "dashscope", "completed")
    emulator.force_status("dashscope", ids[1], status)
    with pytest.raises(FAILURES[status], match="part 2 of 3"):
        sensor(batch_id=ids, conn_id=connect("dashscope"), deferrable=True).execute(context)

    left = sensor(batch_id=ids, conn_id=connect("dashscope"), deferrable=True, expect_resubmission=True)
    result = left.execute(context)

    assert [b["status"] for b in result["batches"]] == ["completed", status, "completed"]
    # A part that failed is not a resubmission's to mend: it still fails the sensor.
    emulator.force_status("dashscope", ids[1], "failed")
    with pytest.raises(BatchFailedError, match="part 2 of 3"):
        left.execute(context)
