from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from airflow_provider_llmbatch.models import (
    FAILURE_STATUSES,
    IN_PROGRESS_STATUSES,
    SUCCESS_STATUSES,
    TERMINAL_STATUSES,
    Batch,
    BatchStatus,
    FileObject,
    Page,
    parse_timestamp,
)
from airflow_provider_llmbatch.result_lines import ResultLine

SECONDS = 1_735_689_600  # 2025-01-01T00:00:00Z
WHEN = datetime(2025, 1, 1, tzinfo=UTC)


def _batch(**fields: Any) -> dict[str, Any]:
    return {"id": "batch_1", "status": "in_progress", **fields}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SECONDS, WHEN),
        (SECONDS * 1000, WHEN),
        (float(SECONDS), WHEN),
        (str(SECONDS), WHEN),
        (str(SECONDS * 1000), WHEN),
        ("2025-01-01T00:00:00Z", WHEN),
        ("2025-01-01T00:00:00", WHEN),
        (None, None),
        ("", None),
        (0, None),
        (-5, None),
        (True, None),
        ("soon", None),
        ({"t": 1}, None),
        (float("nan"), None),
    ],
)
def test_timestamps_in_seconds_or_milliseconds(value: Any, expected: datetime | None) -> None:
    assert parse_timestamp(value) == expected
    assert Batch.model_validate(_batch(created_at=value)).created_at == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", None), (None, None), ("file-out-1", "file-out-1"), (123, "123"), ({"id": "x"}, None), ([], None)],
)
def test_unset_file_ids(raw: Any, expected: str | None) -> None:
    batch = Batch.model_validate(_batch(output_file_id=raw, error_file_id=raw))
    assert batch.output_file_id == expected
    assert batch.error_file_id == expected


@pytest.mark.parametrize(
    ("counts", "total", "completed", "failed", "done"),
    [
        ({"total": 10, "completed": 7, "failed": 1}, 10, 7, 1, 8),
        ({"total": None, "completed": None, "failed": None}, None, None, None, 0),
        ({"total": "10", "completed": 2.0, "failed": "x"}, 10, 2, None, 2),
        ({}, None, None, None, 0),
        (None, None, None, None, 0),
        ("garbage", None, None, None, 0),
        ({"total": True}, None, None, None, 0),
    ],
    ids=["normal", "null-values", "wrong-types", "empty", "null", "not-an-object", "bool"],
)
def test_request_counts(
    counts: Any, total: int | None, completed: int | None, failed: int | None, done: int
) -> None:
    batch = Batch.model_validate(_batch(request_counts=counts))
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        total,
        completed,
        failed,
    )
    assert batch.request_counts.done == done


def test_request_counts_absent() -> None:
    batch = Batch.model_validate(_batch())
    assert batch.request_counts.total is None
    assert batch.request_counts.done == 0


@pytest.mark.parametrize(
    ("errors", "described"),
    [
        (
            {"object": "list", "data": [{"code": "bad", "message": "m", "line": 3, "param": "body"}]},
            ["line 3: bad: m [body]"],
        ),
        ([{"code": "c", "message": "m"}], ["c: m"]),
        ({"code": "c", "message": "single object"}, ["c: single object"]),
        ({"data": None}, []),
        (None, []),
        ("oops", []),
        ([{"message": "ok"}, "not-an-object", 3], ["ok"]),
    ],
    ids=["data-list", "bare-list", "single-object", "data-null", "null", "string", "mixed"],
)
def test_errors_in_any_shape(errors: Any, described: list[str]) -> None:
    batch = Batch.model_validate(_batch(errors=errors))
    assert [e.describe() for e in batch.errors] == described


def test_errors_absent() -> None:
    assert Batch.model_validate(_batch()).errors == []


def test_unknown_fields_are_ignored_and_kept_raw() -> None:
    data = _batch(brand_new_field={"x": 1}, expired_at=None, usage={"tokens": 3})
    batch = Batch.model_validate(data)
    assert batch.raw["brand_new_field"] == {"x": 1}
    assert not hasattr(batch, "brand_new_field")


@pytest.mark.parametrize(
    ("status", "state", "terminal"),
    [
        ("completed", BatchStatus.COMPLETED, True),
        ("COMPLETED ", BatchStatus.COMPLETED, True),
        ("failed", BatchStatus.FAILED, True),
        ("expired", BatchStatus.EXPIRED, True),
        ("cancelled", BatchStatus.CANCELLED, True),
        ("cancelling", BatchStatus.CANCELLING, False),
        ("validating", BatchStatus.VALIDATING, False),
        ("finalizing", BatchStatus.FINALIZING, False),
        ("paused", None, False),
        ("succeeded", None, False),
    ],
)
def test_status_and_terminality(status: str, state: BatchStatus | None, terminal: bool) -> None:
    batch = Batch.model_validate(_batch(status=status))
    assert batch.state == state
    assert batch.is_terminal is terminal


def test_status_sets_are_consistent() -> None:
    assert set(BatchStatus) == TERMINAL_STATUSES | IN_PROGRESS_STATUSES
    assert not TERMINAL_STATUSES & IN_PROGRESS_STATUSES
    assert SUCCESS_STATUSES | FAILURE_STATUSES == TERMINAL_STATUSES


@pytest.mark.parametrize(
    "data",
    [
        {"status": "completed"},
        {"id": "", "status": "completed"},
        {"id": None, "status": "completed"},
        {"id": "b", "status": None},
        {"id": {"nested": 1}, "status": "completed"},
        [],
        "batch",
    ],
    ids=["no-id", "empty-id", "null-id", "null-status", "object-id", "list", "string"],
)
def test_a_batch_without_identity_is_rejected(data: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        Batch.model_validate(data)


def test_numeric_id_is_read_as_text() -> None:
    assert Batch.model_validate({"id": 42, "status": "completed"}).id == "42"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"a": "b", "n": 1, "none": None}, {"a": "b", "n": "1", "none": ""}),
        (None, None),
        ("x", None),
        ([], None),
    ],
)
def test_metadata_reads_as_strings(metadata: Any, expected: dict[str, str] | None) -> None:
    assert Batch.model_validate(_batch(metadata=metadata)).metadata == expected


@pytest.mark.parametrize(
    ("data", "ids", "first", "last", "has_more"),
    [
        (
            {"data": [{"id": "a", "status": "completed"}], "first_id": "a", "last_id": "a", "has_more": True},
            ["a"],
            "a",
            "a",
            True,
        ),
        ({"data": None, "has_more": False}, [], None, None, False),
        ({"data": []}, [], None, None, None),
        ({"data": [{"id": "a", "status": "completed"}]}, ["a"], None, None, None),
        ({"data": [{"id": "a", "status": "x"}, "junk", 3], "has_more": "yes"}, ["a"], None, None, None),
        ({}, [], None, None, None),
        ({"data": "nope", "first_id": "", "last_id": ""}, [], None, None, None),
    ],
    ids=["full", "data-null", "no-has-more", "no-first-last", "junk-items", "empty-object", "wrong-types"],
)
def test_pages(
    data: dict[str, Any], ids: list[str], first: str | None, last: str | None, has_more: bool | None
) -> None:
    page = Page[Batch].model_validate(data)
    assert [b.id for b in page.data] == ids
    assert (page.first_id, page.last_id, page.has_more) == (first, last, has_more)


@pytest.mark.parametrize(
    ("data", "bytes_", "created"),
    [
        ({"id": "f", "bytes": 10, "created_at": SECONDS}, 10, WHEN),
        ({"id": "f", "bytes": "10", "created_at": SECONDS * 1000}, 10, WHEN),
        ({"id": "f", "bytes": None, "created_at": None}, None, None),
        ({"id": "f"}, None, None),
    ],
)
def test_file_objects(data: dict[str, Any], bytes_: int | None, created: datetime | None) -> None:
    file = FileObject.model_validate(data)
    assert file.bytes == bytes_
    assert file.created_at == created


@pytest.mark.parametrize(
    ("line", "succeeded", "code"),
    [
        ({"custom_id": "a", "response": {"status_code": 200, "body": {}}}, True, None),
        ({"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None}, True, None),
        ({"custom_id": "a", "response": None, "error": {"code": "bad", "message": "m"}}, False, "bad"),
        (
            {"custom_id": "a", "response": {"status_code": 400, "body": {"error": {"code": "e1"}}}},
            False,
            "e1",
        ),
        ({"custom_id": "a", "error": "a plain string"}, False, None),
        ({"custom_id": "a"}, False, None),
    ],
    ids=["zhipu-ok", "openai-ok", "error-object", "error-in-body", "error-string", "nothing"],
)
def test_result_lines(line: dict[str, Any], succeeded: bool, code: str | None) -> None:
    result = ResultLine.model_validate(line)
    assert result.succeeded is succeeded
    assert result.error_code == code


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"total": 5, "completed": 3, "failed": 1}, (5, 3, 1)),  # Zhipu: the counts flat at the top level
        ({"request_counts": {"total": 5, "completed": 4, "failed": 0}}, (5, 4, 0)),
        ({"request_counts": {"total": 5, "completed": 4, "failed": 0}, "total": 9}, (5, 4, 0)),
        ({}, (None, None, None)),
    ],
)
def test_batch_reads_nested_and_flat_counts(raw, expected):
    batch = Batch.model_validate({"id": "b", "status": "in_progress", **raw})
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == expected


# The batch object as Zhipu's API reference prints it (docs.bigmodel.cn, "获取批处理任务详情"): request_counts
# typed as an integer, and the counts flat beside it. Values filled in where the page shows placeholders.
ZHIPU_DOC_BATCH = json.loads(
    """
    {
      "id": "batch_1", "object": "batch", "endpoint": "/v4/chat/completions", "input_file_id": "file_1",
      "completion_window": "24h", "status": "completed", "output_file_id": "file_2", "error_file_id": "",
      "created_at": 1735113344, "in_progress_at": 1735113345, "expires_at": 1735199744,
      "finalizing_at": 1735113400, "completed_at": 1735113401, "failed_at": null, "expired_at": null,
      "cancelling_at": null, "cancelled_at": null,
      "request_counts": 10, "total": 10, "completed": 8, "failed": 2,
      "metadata": {}
    }
    """
)


@pytest.mark.parametrize(
    ("request_counts", "expected"),
    [
        (10, (10, 8, 2)),  # the page's shape: an integer beside the flat counts
        (None, (10, 8, 2)),
        ({}, (10, 8, 2)),
        ({"total": None, "completed": None, "failed": None}, (10, 8, 2)),  # nulls never hide the flat counts
        ({"total": 10, "completed": 8}, (10, 8, 2)),  # each count from where it is
        ({"total": 10, "completed": 9, "failed": 1}, (10, 9, 1)),  # the object wins where it has a count
    ],
    ids=["doc-integer", "null", "empty", "all-null", "partial", "object-wins"],
)
def test_zhipu_documented_batch_shape(request_counts: Any, expected: tuple[int, int, int]) -> None:
    batch = Batch.model_validate({**ZHIPU_DOC_BATCH, "request_counts": request_counts})
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == expected
    assert batch.summary()["request_counts"] == dict(
        zip(("total", "completed", "failed"), expected, strict=True)
    )
    assert batch.error_file_id is None


def test_zhipu_validating_batch_with_every_count_null_reads_as_unknown() -> None:
    raw = {**ZHIPU_DOC_BATCH, "status": "validating", "request_counts": None}
    raw.update(total=None, completed=None, failed=None)
    counts = Batch.model_validate(raw).request_counts
    assert (counts.total, counts.completed, counts.failed) == (None, None, None)
