"""
Pydantic models of the Batch API objects, read leniently.

Real responses differ from the documents (see the registry's ``Quirks``). Every model here reads all
known variants for every vendor: timestamps in seconds or milliseconds (or null), ``""`` for an unset
file id, null or missing ``request_counts`` (or the counts flat beside it), ``data: null`` pages, pages
without ``first_id``/``last_id`` or ``has_more``, ``errors`` as an object, a list or absent, scalars of the
wrong JSON type, and fields nobody documented. Normalised values are the attributes; the vendor's JSON is
kept in ``raw``.

The lines of output and error files are read by the same rules in
:mod:`airflow_provider_llmbatch.result_lines`.

Only the identity of an object is required (a batch's ``id`` and ``status``, a file's ``id``); a model
that lacks it raises :class:`pydantic.ValidationError`, which the hook reports as a malformed response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator


class BatchStatus(StrEnum):
    """The eight batch statuses every vendor uses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


IN_PROGRESS_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING}
)
"""Statuses from which the batch will still move on."""

TERMINAL_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
"""Statuses a batch never leaves."""

SUCCESS_STATUSES: frozenset[BatchStatus] = frozenset({BatchStatus.COMPLETED})
"""Terminal statuses that may count as success (subject to the failed-request policy)."""

FAILURE_STATUSES: frozenset[BatchStatus] = TERMINAL_STATUSES - SUCCESS_STATUSES
"""Terminal statuses that never count as success."""

CANCELLABLE_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING}
)
"""Statuses from which a cancel request is accepted."""

# Seconds since the epoch above this are milliseconds: 1e11 s is the year 5138.
_MS_THRESHOLD = 100_000_000_000


def parse_timestamp(value: Any) -> datetime | None:
    """Return an aware UTC datetime from seconds or milliseconds since the epoch (number or digits)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                return None
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    elif isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            # An integer beyond any float is no timestamp.
            return None
    else:
        return None
    if not math.isfinite(number) or number <= 0:
        return None
    if number >= _MS_THRESHOLD:
        number /= 1000.0
    try:
        return datetime.fromtimestamp(number, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def optional_str(value: Any) -> str | None:
    """Read a scalar as text; ``""`` and non-scalars read as unset."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text or None


def optional_int(value: Any) -> int | None:
    """Read a number or numeric text as an integer; anything else reads as unset."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except (ValueError, OverflowError):
            return None
    return None


def _str_map(value: Any) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _required_str(value: Any) -> Any:
    """Coerce a scalar id to text; leave anything else for pydantic to reject."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


Timestamp = Annotated[datetime | None, BeforeValidator(parse_timestamp)]
OptStr = Annotated[str | None, BeforeValidator(optional_str)]
OptInt = Annotated[int | None, BeforeValidator(optional_int)]
ReqStr = Annotated[str, BeforeValidator(_required_str), Field(min_length=1)]


class LenientModel(BaseModel):
    """A model of a vendor object: unknown fields are ignored, the vendor's JSON is kept in ``raw``."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, Mapping):
            model._raw = dict(data)
        return model

    @property
    def raw(self) -> dict[str, Any]:
        """Return the object as the vendor sent it."""
        return self._raw


class RequestCounts(LenientModel):
    """How many requests of a batch exist, completed and failed; ``None`` where the vendor said null."""

    total: OptInt = None
    completed: OptInt = None
    failed: OptInt = None

    @property
    def done(self) -> int:
        """Return requests finished either way."""
        return (self.completed or 0) + (self.failed or 0)


COUNT_FIELDS = ("total", "completed", "failed")
"""The request counts of a batch, under ``request_counts`` or (Zhipu) at the top level as well."""


def _counts(value: Any) -> Any:
    return value if isinstance(value, Mapping) else {}


class BatchError(LenientModel):
    """One error of a batch: usually a validation problem of one input line."""

    code: OptStr = None
    message: OptStr = None
    param: OptStr = None
    line: OptInt = None

    def describe(self) -> str:
        """Return the error as one readable line."""
        where = f"line {self.line}: " if self.line is not None else ""
        param = f" [{self.param}]" if self.param else ""
        code = f"{self.code}: " if self.code else ""
        return f"{where}{code}{self.message or 'no message'}{param}"


def _batch_errors(value: Any) -> list[Any]:
    """Read ``errors`` as ``{"data": [...]}``, a bare list, a single object or nothing."""
    if isinstance(value, Mapping):
        value = value.get("data", [value] if ("message" in value or "code" in value) else [])
    if not isinstance(value, list):
        return []
    return [e for e in value if isinstance(e, Mapping)]


class Batch(LenientModel):
    """A batch as any vendor returns it; file ids are ``None`` while unset, timestamps aware UTC."""

    id: ReqStr
    status: Annotated[str, BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)]
    object: OptStr = None
    endpoint: OptStr = None
    input_file_id: OptStr = None
    output_file_id: OptStr = None
    error_file_id: OptStr = None
    completion_window: OptStr = None
    created_at: Timestamp = None
    in_progress_at: Timestamp = None
    expires_at: Timestamp = None
    finalizing_at: Timestamp = None
    completed_at: Timestamp = None
    failed_at: Timestamp = None
    expired_at: Timestamp = None
    cancelling_at: Timestamp = None
    cancelled_at: Timestamp = None
    request_counts: Annotated[RequestCounts, BeforeValidator(_counts)] = RequestCounts()
    metadata: Annotated[dict[str, str] | None, BeforeValidator(_str_map)] = None
    errors: Annotated[list[BatchError], BeforeValidator(_batch_errors)] = []

    @model_validator(mode="before")
    @classmethod
    def _flat_counts(cls, data: Any) -> Any:
        """
        Read the counts from ``request_counts`` and from the top level, whichever holds them.

        Zhipu documents both at once: ``"request_counts": 123`` beside flat ``total``, ``completed`` and
        ``failed``. A count ``request_counts`` holds wins; one it lacks (absent, null, not a number, or
        ``request_counts`` not an object at all) is read from the top level.
        """
        if not isinstance(data, Mapping):
            return data
        nested = data.get("request_counts")
        counts = dict(nested) if isinstance(nested, Mapping) else {}
        for name in COUNT_FIELDS:
            if optional_int(counts.get(name)) is None and optional_int(data.get(name)) is not None:
                counts[name] = data[name]
        return {**data, "request_counts": counts} if counts or nested is not None else data

    @property
    def state(self) -> BatchStatus | None:
        """Return the status as an enum member, or None for a status nobody documented."""
        try:
            return BatchStatus(self.status)
        except ValueError:
            return None

    @property
    def is_terminal(self) -> bool:
        """Return True once the batch can no longer change; an unknown status is not terminal."""
        return self.state in TERMINAL_STATUSES

    def summary(self) -> dict[str, Any]:
        """Return the batch as JSON primitives, small enough for XCom and trigger events."""
        counts = self.request_counts
        return {
            "batch_id": self.id,
            "status": self.status,
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "finished_at": next(
                (
                    t.isoformat()
                    for t in (self.completed_at, self.failed_at, self.expired_at, self.cancelled_at)
                    if t is not None
                ),
                None,
            ),
            "errors": [e.describe() for e in self.errors[:20]],
        }


class FileObject(LenientModel):
    """A stored file: request, output or error."""

    id: ReqStr
    object: OptStr = None
    bytes: OptInt = None
    created_at: Timestamp = None
    filename: OptStr = None
    purpose: OptStr = None
    status: OptStr = None

    def holds_whole(self, size: int) -> bool:
        """Return whether this file can stand for an upload of ``size`` bytes (size as listed, not failed)."""
        return (self.bytes is None or self.bytes == size) and self.status not in ("error", "deleted")


T = TypeVar("T", bound=LenientModel)


def _page_data(value: Any) -> list[Any]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


class Page(BaseModel, Generic[T]):
    """One page of a list call; ``data: null`` reads as empty, a missing ``has_more`` as None."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    data: Annotated[list[T], BeforeValidator(_page_data)] = []
    first_id: OptStr = None
    last_id: OptStr = None
    has_more: Annotated[bool | None, BeforeValidator(lambda v: v if isinstance(v, bool) else None)] = None


class RequestLine(BaseModel):
    """One line of a request file, as every vendor documents it."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1)
    method: str = "POST"
    url: str
    body: dict[str, Any]
