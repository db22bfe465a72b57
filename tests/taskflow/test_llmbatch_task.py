"""
``@task.llmbatch``: registered with Airflow, one task runs the whole job, and a cleared task re-attaches.

These run the decorated task's ``execute`` against the emulator on loopback (polling on the worker);
``test_mapped_dag.py`` runs it deferred, mapped, under ``dag.test()``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, task

from airflow_provider_llmbatch.decorators.llmbatch import _LLMBatchDecoratedOperator
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.operators.run import RunBatchOperator
from tests.operators.conftest import FakeTI, make_context

RECORDS = [{"custom_id": f"r{i}", "prompt": f"review number {i}"} for i in range(4)]


def _operator(tmp_path: Path, conn_id: str, returns: Any, **kwargs: Any) -> _LLMBatchDecoratedOperator:
    with DAG("taskflow_probe", schedule=None, start_date=datetime(2026, 1, 1)):

        @task.llmbatch(
            conn_id=conn_id,
            model="test-model",
            deferrable=False,
            poll_interval=0.05,
            max_poll_interval=0.2,
            destination=str(tmp_path / "results.jsonl"),
            request_file_destination=str(tmp_path / "requests.jsonl"),
            **kwargs,
        )
        def reviews() -> Any:
            return returns

        made = reviews()
    operator = made.operator
    assert isinstance(operator, _LLMBatchDecoratedOperator)
    return operator


def _rows(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(uri.removeprefix("file://")).read_text().splitlines()]


def test_the_decorator_is_registered_through_provider_info() -> None:
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    decorators = ProvidersManagerTaskRuntime().taskflow_decorators
    assert "llmbatch" in decorators
    assert issubclass(_LLMBatchDecoratedOperator, RunBatchOperator)


@pytest.mark.integration
def test_one_task_creates_waits_fetches_and_returns_the_manifest(
    connect: Any, emulator: Any, tmp_path: Path
) -> None:
    conn_id = connect("zhipu", "llmbatch_test")
    operator = _operator(tmp_path, conn_id, RECORDS, max_input_tokens=10_000)
    ti = FakeTI(task_id=operator.task_id)

    manifest = operator.execute(make_context(ti))

    assert manifest["counts"]["total"] == manifest["counts"]["succeeded"] == len(RECORDS)
    assert [row["custom_id"] for row in _rows(manifest["result_uri"])] == [r["custom_id"] for r in RECORDS]
    assert manifest["estimate"]["requests"] == len(RECORDS)
    assert manifest["estimate"]["input_tokens"] > 0
    assert manifest["usage"]["prompt_tokens"] > 0
    stats = emulator.stats("zhipu")
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


@pytest.mark.integration
def test_a_request_file_path_returned_by_the_function_is_sent(
    connect: Any, emulator: Any, tmp_path: Path
) -> None:
    from airflow_provider_llmbatch.jsonl import build_request_file

    conn_id = connect("openai", "llmbatch_test")
    path = tmp_path / "given.jsonl"
    build_request_file(RECORDS, path, "openai", model="test-model")
    operator = _operator(tmp_path, conn_id, str(path))

    manifest = operator.execute(make_context(FakeTI(task_id=operator.task_id)))

    assert manifest["counts"]["succeeded"] == len(RECORDS)
    assert manifest["input_uri"] == str(path)
    assert emulator.stats("openai")["batches_created"] == 1


@pytest.mark.integration
def test_a_cleared_task_reattaches_instead_of_paying_again(
    connect: Any, emulator: Any, tmp_path: Path
) -> None:
    conn_id = connect("moonshot", "llmbatch_test")
    operator = _operator(tmp_path, conn_id, RECORDS)
    ti = FakeTI(task_id=operator.task_id)
    first = operator.execute(make_context(ti))

    # Cleared: the same task instance runs again from the start, with no state store left.
    again = _operator(tmp_path, conn_id, RECORDS).execute(make_context(FakeTI(task_id=operator.task_id)))

    assert again["batch_ids"] == first["batch_ids"]
    assert again["counts"] == first["counts"]
    stats = emulator.stats("moonshot")
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


@pytest.mark.integration
def test_an_over_budget_function_result_sends_nothing(connect: Any, emulator: Any, tmp_path: Path) -> None:
    from airflow_provider_llmbatch.budget import BudgetExceededError

    conn_id = connect("dashscope", "llmbatch_test")
    operator = _operator(tmp_path, conn_id, RECORDS, max_input_tokens=5)

    with pytest.raises(BudgetExceededError, match="max_input_tokens=5"):
        operator.execute(make_context(FakeTI(task_id=operator.task_id)))
    assert not emulator.stats("dashscope")["operations"]


@pytest.mark.parametrize("returned", [None, {"custom_id": "a"}, b"bytes", 3])
def test_a_function_returning_no_records_or_path_is_refused(tmp_path: Path, returned: Any) -> None:
    operator = _operator(tmp_path, "llmbatch_test", returned)

    with pytest.raises(InvalidInputError, match="must return records"):
        operator.execute(make_context(FakeTI(task_id=operator.task_id)))


def test_the_input_comes_from_the_function_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="drop requests="):
        _operator(tmp_path, "llmbatch_test", RECORDS, requests=RECORDS)


def test_wait_for_completion_is_always_on() -> None:
    op = RunBatchOperator(task_id="run", requests=RECORDS, model="m", wait_for_completion=False)
    assert op.wait_for_completion is True
    assert "batch_id" not in op.template_fields


@pytest.mark.integration
@pytest.mark.parametrize("vendor", ["zhipu", "dashscope"])
def test_rows_worth_retrying_are_resubmitted_in_the_same_task(
    vendor: str, connect: Any, emulator: Any, tmp_path: Path
) -> None:
    conn_id = connect(vendor, "llmbatch_test")
    records = [*RECORDS, {"custom_id": "retry-1", "prompt": "busy"}, {"custom_id": "fail-1", "prompt": "bad"}]
    operator = _operator(tmp_path, conn_id, records, resubmit_failed=1, max_failed_fraction=0.5)

    manifest = operator.execute(make_context(FakeTI(task_id=operator.task_id)))

    rows = {row["custom_id"]: row for row in _rows(manifest["result_uri"])}
    assert list(rows) == [r["custom_id"] for r in records]
    assert (rows["retry-1"]["status"], rows["retry-1"]["attempts"]) == ("succeeded", 2)
    assert (rows["fail-1"]["status"], rows["fail-1"]["attempts"]) == ("failed", 1)
    assert manifest["counts"]["succeeded"] == len(RECORDS) + 1
    assert len(manifest["rounds"]) == 1
    # One batch for the job, one for the round: nothing created twice.
    assert emulator.stats(vendor)["batches_created"] == 2


@pytest.mark.integration
def test_failures_over_the_limit_still_fail_after_the_rounds(
    connect: Any, emulator: Any, tmp_path: Path
) -> None:
    from airflow_provider_llmbatch.exceptions import TooManyFailedRequestsError

    conn_id = connect("zhipu", "llmbatch_test")
    records = [*RECORDS, {"custom_id": "fail-1", "prompt": "bad"}]
    operator = _operator(tmp_path, conn_id, records, resubmit_failed=1)

    with pytest.raises(TooManyFailedRequestsError):
        operator.execute(make_context(FakeTI(task_id=operator.task_id)))
