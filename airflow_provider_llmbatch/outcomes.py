"""
The one table from a finished batch to an outcome.

The sensor, the trigger's consumers and the operators all call :func:`judge`; no other module decides
whether a batch "worked". A status nobody documented is never success.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from airflow_provider_llmbatch.exceptions import (
    BatchCancelledError,
    BatchExpiredError,
    BatchFailedError,
    BatchOutcomeError,
    InvalidInputError,
    TooManyFailedRequestsError,
)
from airflow_provider_llmbatch.models import BatchStatus

log = logging.getLogger(__name__)

OUTCOME_ERRORS: Mapping[BatchStatus, type[BatchOutcomeError] | None] = MappingProxyType(
    {
        BatchStatus.COMPLETED: None,
        BatchStatus.FAILED: BatchFailedError,
        BatchStatus.EXPIRED: BatchExpiredError,
        BatchStatus.CANCELLED: BatchCancelledError,
    }
)
"""Terminal status -> the exception it raises (``None``: success, subject to the failed-request policy)."""

_MAX_LISTED_ERRORS = 20


def _count(counts: Mapping[str, Any], key: str) -> int:
    value = counts.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    return max(int(value), 0)


def request_counts(summary: Mapping[str, Any]) -> tuple[int, int, int]:
    """
    Return ``(completed, failed, total)`` of a batch summary; null or missing counts read as 0.

    A total smaller than ``completed + failed`` (or missing) is raised to their sum.
    """
    raw = summary.get("request_counts")
    counts: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    completed, failed = _count(counts, "completed"), _count(counts, "failed")
    total = max(_count(counts, "total"), completed + failed)
    return completed, failed, total


def failed_fraction(summary: Mapping[str, Any]) -> float:
    """Return the share of a batch's requests that failed (0.0 for a batch without requests)."""
    _, failed, total = request_counts(summary)
    return failed / total if total else 0.0


def describe(summary: Mapping[str, Any]) -> str:
    """Return one line naming the batch, its status and its counts, for logs and messages."""
    completed, failed, total = request_counts(summary)
    return (
        f"batch {summary.get('batch_id') or '?'} is {summary.get('status') or '?'}: "
        f"{completed} completed, {failed} failed of {total} requests"
    )


def _vendor_errors(summary: Mapping[str, Any]) -> list[str]:
    errors = summary.get("errors")
    if not isinstance(errors, list):
        return []
    return [str(e) for e in errors[:_MAX_LISTED_ERRORS]]


def _message(headline: str, summary: Mapping[str, Any]) -> str:
    errors = _vendor_errors(summary)
    if not errors:
        return headline
    listing = "\n".join(f"  {e}" for e in errors)
    return f"{headline}\nvendor errors:\n{listing}"


def judge(summary: Mapping[str, Any], *, max_failed_fraction: float = 0.0) -> None:
    """
    Raise unless a finished batch counts as success; return None when it does.

    :param summary: the batch as :meth:`Batch.summary` gives it (JSON primitives).
    :param max_failed_fraction: the share of failed requests a completed batch may have (0.0 to 1.0).
    :raises BatchFailedError: the batch ended ``failed``; the vendor's errors are in the message.
    :raises BatchExpiredError: the batch ended ``expired``.
    :raises BatchCancelledError: the batch ended ``cancelled``.
    :raises TooManyFailedRequestsError: it completed, but ``failed / total > max_failed_fraction``.
    :raises BatchOutcomeError: the status is not terminal, or nobody documented it.
    """
    if not 0.0 <= max_failed_fraction <= 1.0:
        raise InvalidInputError(
            f"max_failed_fraction must be between 0.0 and 1.0, got {max_failed_fraction!r}"
        )
    batch_id = str(summary.get("batch_id") or "")
    status = str(summary.get("status") or "")
    line = describe(summary)
    try:
        state: BatchStatus | None = BatchStatus(status)
    except ValueError:
        state = None
    if state is None or state not in OUTCOME_ERRORS:
        log.error("%s; not a terminal status, so not a success", line)
        raise BatchOutcomeError(
            _message(f"{line}; not a terminal status, so not a success", summary),
            batch_id=batch_id,
            status=status,
            summary=summary,
        )
    error = OUTCOME_ERRORS[state]
    if error is not None:
        log.error("%s", line)
        raise error(_message(line, summary), batch_id=batch_id, status=status, summary=summary)
    fraction = failed_fraction(summary)
    if fraction > max_failed_fraction:
        headline = f"{line}; {fraction:.2%} failed, more than the {max_failed_fraction:.2%} allowed"
        log.error("%s", headline)
        raise TooManyFailedRequestsError(
            _message(headline, summary), batch_id=batch_id, status=status, summary=summary
        )
    log.info("%s", line)
