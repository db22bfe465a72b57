"""
A batch as common-ai sees it: its status in common-ai's small vocabulary, its result lines, their output.

The lines of output and error files are read leniently in every vendor's shape by
:func:`~airflow_provider_llmbatch.result_lines.read_result_line`, the same reading the results join uses;
this module only says what each line means in common-ai's terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.providers.common.ai.batch.base import BatchState, ExtractedOutput, RawResultItem

from airflow_provider_llmbatch.models import Batch, BatchStatus
from airflow_provider_llmbatch.result_lines import read_result_line
from airflow_provider_llmbatch.schema import unwrap_answer
from airflow_provider_llmbatch.typed_output import answer_text

if TYPE_CHECKING:
    from airflow.providers.common.ai.batch.base import BatchStatus as AIStatus
    from airflow.providers.common.ai.batch.output_schema import OutputSpec

TERMINAL: Mapping[BatchStatus, AIStatus] = {
    BatchStatus.COMPLETED: "completed",
    BatchStatus.FAILED: "failed",
    BatchStatus.EXPIRED: "expired",
    BatchStatus.CANCELLED: "cancelled",
}
"""Our terminal statuses in common-ai's words; every other status (``cancelling``, unknown) is in progress."""

UNRUN_CODES: Mapping[str, str] = {"batch_expired": "expired", "batch_cancelled": "cancelled"}
"""Error codes of a line for a request that never ran (no response), and what it means to common-ai."""


def batch_state(batch: Batch) -> BatchState:
    """
    Return a batch as common-ai's :class:`BatchState`; an unknown status is in progress, never success.

    The vendor's counts are progress counters (total, completed, failed): once the batch expired or was
    cancelled, what was neither completed nor failed never ran and is counted as such.
    """
    status: AIStatus = TERMINAL.get(batch.state, "in_progress") if batch.state else "in_progress"
    counts = batch.request_counts
    breakdown: dict[str, int] | None = None
    if counts.total is not None or counts.completed is not None or counts.failed is not None:
        remainder = max((counts.total or 0) - counts.done, 0)
        breakdown = {
            "succeeded": counts.completed or 0,
            "errored": counts.failed or 0,
            "expired": remainder if status == "expired" else 0,
            "cancelled": remainder if status == "cancelled" else 0,
        }
    message = "; ".join(error.describe() for error in batch.errors) or None
    return BatchState(status=status, counts=breakdown, error_message=message)


def index_of(custom_id: str) -> int:
    """
    Return the input position a ``custom_id`` written as ``<key16>-<index>`` stands for.

    :raises ValueError: for an id this adapter did not write.
    """
    _, sep, tail = custom_id.rpartition("-")
    if not sep or not tail.isdecimal():
        raise ValueError(f"custom_id {custom_id[:80]!r} is not <key>-<index>")
    return int(tail)


def result_item(data: Mapping[str, Any]) -> RawResultItem:
    """
    Return one parsed output or error line as common-ai's :class:`RawResultItem`.

    :raises ValueError: when the line has no ``custom_id`` this adapter wrote.
    """
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str):
        raise ValueError("the line has no custom_id")
    index = index_of(custom_id)
    line = read_result_line(data)
    body = line.body or {}
    usage = {
        "input_tokens": line.usage.get("prompt_tokens", line.usage.get("input_tokens", 0)),
        "output_tokens": line.usage.get("completion_tokens", line.usage.get("output_tokens", 0)),
    }
    model = body.get("model") if isinstance(body.get("model"), str) else None
    if not line.succeeded:
        code = line.error_code
        never_ran = not line.has_response and (code or "") in UNRUN_CODES
        status = UNRUN_CODES[code or ""] if never_ran else "errored"
        return RawResultItem(
            custom_id=custom_id,
            index=index,
            provider_status=status,  # type: ignore[arg-type]
            model=model,
            usage=None,
            finish_reason=None,
            error={
                "type": "provider_error" if status == "errored" else status,
                "message": line.error_message or "request failed",
                "provider_code": code,
                "stage": "provider",
            },
            raw=None,
        )
    content, _ = answer_text(body)  # one reading of a response's answer, as the provider's own fetch has
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
    finish = choice.get("finish_reason")
    return RawResultItem(
        custom_id=custom_id,
        index=index,
        provider_status="success",
        model=model,
        usage=usage,
        finish_reason=finish if isinstance(finish, str) else None,
        error=None,
        raw=content,
    )


def extract(raw: RawResultItem, spec: OutputSpec) -> ExtractedOutput:
    """
    Return the model's answer in the shape common-ai validates.

    In JSON mode some models wrap the object in a Markdown code fence; the fence is dropped, the object
    is validated as it is.
    """
    if raw.raw is None:
        # A refusal, or a token budget spent before any visible output: nothing to hand back.
        return ExtractedOutput(kind="absent")
    if not spec.is_structured:
        return ExtractedOutput(kind="text", text=raw.raw)
    return ExtractedOutput(kind="json_text", text=unwrap_answer(raw.raw))
