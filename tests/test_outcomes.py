from __future__ import annotations

import logging
import pickle
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchOutcomeError,
    InvalidInputError,
    TooManyFailedRequestsError,
)
from airflow_provider_llmbatch.models import TERMINAL_STATUSES, Batch, BatchStatus
from airflow_provider_llmbatch.outcomes import (
    OUTCOME_ERRORS,
    describe,
    judge,
    request_counts,
)


def summary(
    status: str, total: int | None = 10, completed: int | None = 8, failed: int | None = 2, **kw: Any
):
    return {
        "batch_id": "batch-1",
        "status": status,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "errors": [],
        **kw,
    }


def test_table_covers_exactly_the_terminal_statuses():
    assert set(OUTCOME_ERRORS) == set(TERMINAL_STATUSES)
    assert OUTCOME_ERRORS[BatchStatus.COMPLETED] is None
    errors = [OUTCOME_ERRORS[s] for s in TERMINAL_STATUSES if s != BatchStatus.COMPLETED]
    assert len(set(errors)) == len(errors), "each failure status needs its own exception"


# (status, max_failed_fraction) -> expected exception (None: success); counts are 2 failed of 10.
JUDGE_TABLE = [
    ("completed", 0.0, TooManyFailedRequestsError),
    ("completed", 0.1, TooManyFailedRequestsError),
    ("completed", 0.2, None),
    ("completed", 0.5, None),
    ("completed", 1.0, None),
    ("failed", 0.0, BatchFailedError),
    ("failed", 1.0, BatchFailedError),
    ("expired", 0.0, BatchExpiredError),
    ("expired", 1.0, BatchExpiredError),
    ("cancelled", 0.0, BatchCancelledError),
    ("cancelled", 1.0, BatchCancelledError),
    ("in_progress", 1.0, BatchOutcomeError),
    ("validating", 1.0, BatchOutcomeError),
    ("finalizing", 1.0, BatchOutcomeError),
    ("cancelling", 1.0, BatchOutcomeError),
    ("paused_by_vendor", 1.0, BatchOutcomeError),
    ("", 1.0, BatchOutcomeError),
]


@pytest.mark.parametrize(("status", "fraction", "expected"), JUDGE_TABLE)
def test_judge_table(status, fraction, expected):
    s = summary(status)
    if expected is None:
        assert judge(s, max_failed_fraction=fraction) is None
        return
    with pytest.raises(expected) as info:
        judge(s, max_failed_fraction=fraction)
    assert type(info.value) is expected
    assert info.value.batch_id == "batch-1"
    assert info.value.status == status
    assert info.value.summary == s
    assert "batch-1" in str(info.value)
    assert "8 completed, 2 failed of 10" in str(info.value)


def test_all_succeeded_passes_with_zero_tolerance():
    judge(summary("completed", 10, 10, 0))


def test_completed_with_zero_requests_passes():
    judge(summary("completed", 0, 0, 0))


UNKNOWN_COUNTS: list[Any] = [
    None,
    {},
    {"total": None, "completed": None, "failed": None},
    {"total": 10, "completed": None, "failed": None},
    {"total": None, "completed": 3, "failed": None},
    {"total": "many", "completed": True, "failed": float("nan")},
]


@pytest.mark.parametrize("counts", UNKNOWN_COUNTS)
def test_unknown_counts_are_never_zero(counts):
    s = {"batch_id": "b", "status": "completed", "request_counts": counts}
    assert request_counts(s) is None
    assert "request counts unknown" in describe(s)


# (output file, error file, max_failed_fraction) -> expected, when a completed batch has no counts
UNKNOWN_TABLE = [
    ("file-out", None, 0.0, None),  # output exists: the fetch judges the rows
    ("file-out", "file-err", 0.0, None),
    (None, "file-err", 0.0, TooManyFailedRequestsError),  # only errors: every request failed
    (None, "file-err", 0.99, TooManyFailedRequestsError),
    (None, "file-err", 1.0, None),
    (None, None, 1.0, TooManyFailedRequestsError),  # nothing at all came back
]


@pytest.mark.parametrize("counts", UNKNOWN_COUNTS)
@pytest.mark.parametrize(("output", "errors", "fraction", "expected"), UNKNOWN_TABLE)
def test_completed_without_counts_is_judged_from_its_files(counts, output, errors, fraction, expected):
    s = {
        "batch_id": "b",
        "status": "completed",
        "request_counts": counts,
        "output_file_id": output,
        "error_file_id": errors,
    }
    if expected is None:
        judge(s, max_failed_fraction=fraction)
    else:
        with pytest.raises(expected, match="request counts unknown"):
            judge(s, max_failed_fraction=fraction)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ((10, 8, 2), (8, 2, 10)),
        ((2, 2, 2), (2, 2, 4)),  # a total smaller than done (vendors lag) is raised to done
        ((None, 1, 3), (1, 3, 4)),
        ((10, None, 3), (7, 3, 10)),  # completed derived from total and failed
        ((0, 0, 0), (0, 0, 0)),
    ],
)
def test_known_counts(counts, expected):
    assert request_counts(summary("completed", *counts)) == expected


def test_every_failed_request_fails_at_zero_tolerance():
    with pytest.raises(TooManyFailedRequestsError, match="1 failed of 1000"):
        judge(summary("completed", 1000, 999, 1))


def test_failed_batch_lists_vendor_validation_errors():
    batch = Batch.model_validate(
        {
            "id": "batch-v",
            "status": "failed",
            "errors": {
                "data": [
                    {"code": "invalid_json", "message": "bad line", "line": 3},
                    {"code": "missing_field", "message": "no custom_id", "line": 7, "param": "custom_id"},
                ]
            },
        }
    )
    with pytest.raises(BatchFailedError) as info:
        judge(batch.summary())
    text = str(info.value)
    assert "line 3: invalid_json: bad line" in text
    assert "line 7: missing_field: no custom_id [custom_id]" in text


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_fraction_is_an_input_error(fraction):
    with pytest.raises(InvalidInputError):
        judge(summary("completed"), max_failed_fraction=fraction)


def test_failures_are_logged_with_counts(caplog):
    caplog.set_level(logging.INFO, logger="airflow_provider_llmbatch.outcomes")
    with pytest.raises(BatchExpiredError):
        judge(summary("expired", 10, 4, 1))
    assert any(
        r.levelno == logging.ERROR and "4 completed, 1 failed of 10" in r.getMessage() for r in caplog.records
    )


def test_outcome_errors_survive_pickling():
    with pytest.raises(BatchCancelledError) as info:
        judge(summary("cancelled"))
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is BatchCancelledError
    assert again.summary == info.value.summary


def test_describe():
    assert (
        describe(summary("in_progress", 5, 1, 1))
        == "batch batch-1 is in_progress: 1 completed, 1 failed of 5 requests"
    )
