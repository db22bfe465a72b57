"""Render stored files, batches, pages and errors the way each vendor answers (its emulator dialect)."""

from __future__ import annotations

from typing import Any

from airflow_provider_llmbatch.emulator.records import BatchRecord, FileRecord
from airflow_provider_llmbatch.emulator.vendor_dialects import PageShape, dialect_of
from airflow_provider_llmbatch.vendors import ErrorKind, VendorSpec

# The ``type`` of an error where a dialect carries both ``type`` and ``code``: the OpenAI family's words.
_ERROR_TYPES: dict[str, str] = {
    "bad_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission_denied": "permission_error",
    "not_found": "invalid_request_error",
    "conflict": "invalid_request_error",
    "file_too_large": "invalid_request_error",
    "rate_limit": "rate_limit_error",
    "quota_exceeded": "insufficient_quota",
    "server": "server_error",
}

_TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def timestamp(spec: VendorSpec, value: float | None) -> int | None:
    """Return an epoch timestamp in the vendor's unit."""
    if value is None:
        return None
    return int(value * 1000) if dialect_of(spec).timestamps_in_ms else int(value)


def unset_file_id(spec: VendorSpec) -> str | None:
    """Return what the vendor sends for a file id that is not set yet."""
    return "" if dialect_of(spec).empty_file_id == "empty_string" else None


def render_file(spec: VendorSpec, record: FileRecord) -> dict[str, Any]:
    """Return a file object."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": timestamp(spec, record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def render_batch(spec: VendorSpec, batch: BatchRecord) -> dict[str, Any]:
    """Return a batch object with the vendor's quirks applied."""
    dialect = dialect_of(spec)
    unset = unset_file_id(spec)
    counts: dict[str, int | None] = {
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
    }
    if batch.status == "validating" and dialect.null_counts_while_validating:
        counts = dict.fromkeys(counts)
    body: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": dialect.completion_window_echo or batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id or unset,
        "error_file_id": batch.error_file_id or unset,
        "created_at": timestamp(spec, batch.created_at),
        "expires_at": timestamp(spec, batch.expires_at),
        "request_counts": counts,
        **(counts if dialect.flat_counts else {}),
        "metadata": batch.metadata,
    }
    for name in _TIMESTAMPS:
        body[name] = timestamp(spec, batch.times.get(name))
    if dialect.batch_has_errors:
        body["errors"] = (
            {"object": "list", "data": [p.as_dict() for p in batch.errors]} if batch.errors else None
        )
    if not dialect.batch_has_expired_at:
        body.pop("expired_at")
    return body


def render_page(shape: PageShape, items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """Return a list page in the shape the list endpoint uses."""
    page: dict[str, Any] = {"object": "list", "data": items}
    if not items and shape.data_null_when_empty:
        page["data"] = None
    if shape.has_first_last_ids:
        page["first_id"] = items[0]["id"] if items else None
        page["last_id"] = items[-1]["id"] if items else None
    if shape.has_more:
        page["has_more"] = has_more
    return page


def error_payload(
    spec: VendorSpec,
    kind: ErrorKind,
    message: str,
    *,
    request_id: str,
    param: str | None = None,
    status: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Return the HTTP status and body of an error of ``kind`` in the vendor's dialect."""
    shape = dialect_of(spec).errors
    default_status, code = spec.errors.codes[kind]
    error: dict[str, Any] = {}
    for name in shape.fields:
        if name == "message":
            error["message"] = message
        elif name == "code":
            error["code"] = code
        elif name == "type":
            typed = "code" in shape.fields and kind not in shape.type_is_code
            error["type"] = _ERROR_TYPES[kind] if typed else code
        elif name == "param":
            error["param"] = param
    body: dict[str, Any] = {"error": error}
    if shape.request_id_in_body:
        body["request_id"] = request_id
    return status or default_status, body


def request_id_headers(spec: VendorSpec, request_id: str) -> dict[str, str]:
    """Return the response headers that carry the request id for this vendor."""
    return dict.fromkeys(spec.errors.request_id_headers, request_id)
