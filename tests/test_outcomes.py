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
    failed_fraction,
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


@pytest.mark.parametrize("counts", [(0, 0, 0), (None, None, None), (0, None, None)])
def test_completed_with_no_requests_passes(counts):
    judge(summary("completed", *counts))


def test_missing_request_counts_read_as_zero():
    s = {"batch_id": "b", "status": "completed"}
    assert request_counts(s) == (0, 0, 0)
    judge(s)


def test_failed_fraction_uses_the_larger_of_total_and_done():
    assert failed_fraction(summary("completed", 10, 8, 2)) == pytest.approx(0.2)
    # A total smaller than done (vendors lag) is raised to done.
    assert failed_fraction(summary("completed", 2, 2, 2)) == pytest.approx(0.5)
    assert failed_fraction(summary("completed", None, 1, 3)) == pytest.approx(0.75)
    assert failed_fraction(summary("completed", 0, 0, 0)) == 0.0


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


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
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
