"""
The one table from a finished batch to an outcome.

The sensor, the trigger's consumers and the operators all call :func:`judge`; no other module decides
whether a batch "worked". A status nobody documented is never success.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
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


def _count(counts: Mapping[str, Any], key: str) -> int | None:
    value = counts.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return max(int(value), 0)


def request_counts(summary: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """
    Return ``(completed, failed, total)`` of a batch summary, or None when the counts are unknown.

    Unknown is never zero: counts are known when ``failed`` is a number and so is ``total`` or
    ``completed``. A missing one of those two is derived; a total smaller than ``completed + failed`` is
    raised to their sum.
    """
    raw = summary.get("request_counts")
    counts: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    completed, failed, total = (_count(counts, k) for k in ("completed", "failed", "total"))
    if failed is None or (completed is None and total is None):
        return None
    if completed is None:
        completed = max((total or 0) - failed, 0)
    return completed, failed, max(total or 0, completed + failed)


def describe(summary: Mapping[str, Any]) -> str:
    """Return one line naming the batch, its status and its counts, for logs and messages."""
    counts = request_counts(summary)
    shown = (
        "request counts unknown"
        if counts is None
        else f"{counts[0]} completed, {counts[1]} failed of {counts[2]} requests"
    )
    return f"batch {summary.get('batch_id') or '?'} is {summary.get('status') or '?'}: {shown}"


def check_fraction(value: Any) -> float:
    """Return a ``max_failed_fraction`` argument as a float, or raise :class:`InvalidInputError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise InvalidInputError(f"max_failed_fraction must be from 0.0 to 1.0, got {value!r}")
    return float(value)


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


RESUBMITTABLE_STATUSES: frozenset[BatchStatus] = frozenset({BatchStatus.EXPIRED, BatchStatus.CANCELLED})
"""Ends whose unrun requests a resubmission round can run again (a ``failed`` batch never ran any)."""


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
    judge_parts([summary], max_failed_fraction=max_failed_fraction)


def judge_parts(
    summaries: Sequence[Mapping[str, Any]], *, max_failed_fraction: float = 0.0, resubmitting: bool = False
) -> None:
    """
    Raise unless the parts of one job, together, count as success (one part: :func:`judge`).

    Each part must have ended; a part that ``failed`` fails the whole, naming it, and so does one that
    expired or was cancelled unless ``resubmitting`` (a later round runs its unrun requests again).
    ``max_failed_fraction`` is judged over the requests of all parts together.

    :param summaries: each part's summary, in order.
    :param max_failed_fraction: the share of failed requests the whole may have (0.0 to 1.0).
    :param resubmitting: expired and cancelled parts are left to a resubmission round.
    """
    check_fraction(max_failed_fraction)
    lines = [_part_line(summary, index, len(summaries)) for index, summary in enumerate(summaries)]
    total = failed = 0
    unknown = False
    for summary, line in zip(summaries, lines, strict=True):
        batch_id, status = str(summary.get("batch_id") or ""), str(summary.get("status") or "")
        try:
            state: BatchStatus | None = BatchStatus(status)
        except ValueError:
            state = None
        if state is None or state not in OUTCOME_ERRORS:
            headline = f"{line}; not a terminal status, so not a success"
            log.error("%s", headline)
            raise BatchOutcomeError(
                _message(headline, summary), batch_id=batch_id, status=status, summary=summary
            )
        error = OUTCOME_ERRORS[state]
        if error is not None and not (resubmitting and state in RESUBMITTABLE_STATUSES):
            log.error("%s", line)
            raise error(_message(line, summary), batch_id=batch_id, status=status, summary=summary)
        counts = request_counts(summary)
        if counts is None:
            unknown = True
            if state is BatchStatus.COMPLETED:
                _judge_unknown_counts(summary, line, max_failed_fraction)
            continue
        failed, total = failed + counts[1], total + counts[2]
    whole = lines[0] if len(lines) == 1 else f"{len(lines)} batches: {failed} failed of {total} requests"
    fraction = failed / total if total else 0.0
    if not unknown and exceeds(failed, total, max_failed_fraction):
        headline = f"{whole}; {fraction:.2%} failed, more than the {max_failed_fraction:.2%} allowed"
        log.error("%s", headline)
        first = summaries[0]
        raise TooManyFailedRequestsError(
            _message(headline, first),
            batch_id=str(first.get("batch_id") or ""),
            status=str(first.get("status") or ""),
            summary=first,
        )
    log.info("%s", whole)


def exceeds(failed: int, total: int, max_failed_fraction: float) -> bool:
    """Return whether ``failed`` of ``total`` is more than the share allowed (nothing of nothing is not)."""
    return total > 0 and failed / total > max_failed_fraction


def row_failures(counts: Mapping[str, int], *, invalid_output_fails: bool = True) -> tuple[int, int]:
    """
    Return ``(failed, total)`` of a landing's row counts: every row that did not succeed is failed,
    ``invalid_output`` rows only when ``invalid_output_fails``.
    """
    total = int(counts.get("total", 0))
    ok = int(counts.get("succeeded", 0))
    if not invalid_output_fails:
        ok += int(counts.get("invalid_output", 0))
    return max(total - ok, 0), total


def judge_rows(
    counts: Mapping[str, int],
    *,
    batch_id: str,
    max_failed_fraction: float = 0.0,
    invalid_output_fails: bool = True,
) -> None:
    """
    Raise unless the landed rows of a job count as success: its failed rows within the share allowed.

    The fetch calls it after landing rows an output schema validated (an ``invalid_output`` row is one
    only the fetch can see), and for batches that did not report their request counts.

    :param counts: the rows per status and ``total``, as the join reports them.
    :param batch_id: the job's first batch, for the message.
    :param max_failed_fraction: the share of failed rows allowed (0.0 to 1.0).
    :param invalid_output_fails: count ``invalid_output`` rows as failed. (default: True)
    :raises TooManyFailedRequestsError: naming the rows per status, the share and the limit.
    """
    check_fraction(max_failed_fraction)
    failed, total = row_failures(counts, invalid_output_fails=invalid_output_fails)
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("total", "succeeded") and v)
    line = f"landed rows of batch {batch_id}: {failed} of {total} failed ({shown or 'none'})"
    if not invalid_output_fails and counts.get("invalid_output"):
        line += "; invalid_output rows are not counted as failed (invalid_output_fails=False)"
    if not exceeds(failed, total, max_failed_fraction):
        log.info("%s", line)
        return
    headline = f"{line}; {failed / total:.2%} failed, more than the {max_failed_fraction:.2%} allowed"
    log.error("%s", headline)
    summary = {"batch_id": batch_id, "status": "completed", "request_counts": dict(counts)}
    raise TooManyFailedRequestsError(headline, batch_id=batch_id, status="completed", summary=summary)


def _part_line(summary: Mapping[str, Any], index: int, parts: int) -> str:
    line = describe(summary)
    return line if parts == 1 else f"part {index + 1} of {parts}: {line}"


def _judge_unknown_counts(summary: Mapping[str, Any], line: str, max_failed_fraction: float) -> None:
    """Judge a completed batch without counts from what is known: its result files."""
    batch_id, status = str(summary.get("batch_id") or ""), str(summary.get("status") or "")
    output, errors = summary.get("output_file_id"), summary.get("error_file_id")
    if output:
        # Some requests produced output; how many failed shows only in the files: the fetch judges.
        log.warning("%s; the share of failed requests is judged when the results are fetched", line)
        return
    if errors and max_failed_fraction >= 1.0:
        log.warning("%s; no output file, only an error file, and every request may fail", line)
        return
    what = "only an error file: every request failed" if errors else "neither an output nor an error file"
    headline = f"{line}; {what}"
    log.error("%s", headline)
    raise TooManyFailedRequestsError(
        _message(headline, summary), batch_id=batch_id, status=status, summary=summary
    )
