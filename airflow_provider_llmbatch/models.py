"""
Pydantic models of the Batch API objects, read leniently.

Real responses differ from the documents (see the registry's ``Quirks``). Every model here reads all
known variants for every vendor: timestamps in seconds or milliseconds (or null), ``""`` for an unset
file id, null or missing ``request_counts``, ``data: null`` pages, pages without ``first_id``/``last_id``
or ``has_more``, ``errors`` as an object, a list or absent, scalars of the wrong JSON type, and fields
nobody documented. Normalised values are the attributes; the vendor's JSON is kept in ``raw``.

Only the identity of an object is required (a batch's ``id`` and ``status``, a file's ``id``); a model
that lacks it raises :class:`pydantic.ValidationError`, which the hook reports as a malformed response.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, NamedTuple, TypeVar

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


def _optional_str(value: Any) -> str | None:
    """Read a scalar as text; ``""`` and non-scalars read as unset."""
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    return text or None


def _optional_int(value: Any) -> int | None:
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


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _required_str(value: Any) -> Any:
    """Coerce a scalar id to text; leave anything else for pydantic to reject."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


Timestamp = Annotated[datetime | None, BeforeValidator(parse_timestamp)]
OptStr = Annotated[str | None, BeforeValidator(_optional_str)]
OptInt = Annotated[int | None, BeforeValidator(_optional_int)]
ReqStr = Annotated[str, BeforeValidator(_required_str), Field(min_length=1)]


class _Lenient(BaseModel):
    """Ignore unknown fields, keep the vendor's JSON in ``raw``."""

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


class RequestCounts(_Lenient):
    """How many requests of a batch exist, completed and failed; ``None`` where the vendor said null."""

    total: OptInt = None
    completed: OptInt = None
    failed: OptInt = None

    @property
    def done(self) -> int:
        """Return requests finished either way."""
        return (self.completed or 0) + (self.failed or 0)


def _counts(value: Any) -> Any:
    return value if isinstance(value, Mapping) else {}


class BatchError(_Lenient):
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


class Batch(_Lenient):
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


class FileObject(_Lenient):
    """A stored file: request, output or error."""

    id: ReqStr
    object: OptStr = None
    bytes: OptInt = None
    created_at: Timestamp = None
    filename: OptStr = None
    purpose: OptStr = None
    status: OptStr = None


T = TypeVar("T", bound=_Lenient)


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


class ResultResponse(_Lenient):
    """The ``response`` of an output line."""

    status_code: OptInt = None
    request_id: OptStr = None
    body: Annotated[dict[str, Any] | None, BeforeValidator(_dict_or_none)] = None


class ResultError(_Lenient):
    """The ``error`` of an error line."""

    code: OptStr = None
    message: OptStr = None


def _result_error(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str) and value:
        return {"message": value}
    return None


def _result_response(value: Any) -> Any:
    return value if isinstance(value, Mapping) else None


class ResultLine(_Lenient):
    """One line of an output or error file, in any vendor's shape."""

    id: OptStr = None
    custom_id: OptStr = None
    response: Annotated[ResultResponse | None, BeforeValidator(_result_response)] = None
    error: Annotated[ResultError | None, BeforeValidator(_result_error)] = None

    @property
    def succeeded(self) -> bool:
        """Return True when the request got a 2xx response and no error."""
        error = self.error
        status_code = self.response.status_code if self.response is not None else None
        return _line_succeeded(error.code if error else None, error.message if error else None, status_code)

    @property
    def error_code(self) -> str | None:
        """Return the error code from ``error`` or from the response body's ``error``."""
        return _line_error_code(self.error.code if self.error else None, _body_error(self._body()))

    @property
    def error_message(self) -> str | None:
        """Return the error message from ``error`` or from the response body's ``error``."""
        response = self.response
        return _line_error_message(
            self.error.message if self.error else None,
            _body_error(self._body()),
            response is not None and not self.succeeded,
            response.status_code if response is not None else None,
        )

    @property
    def usage(self) -> dict[str, int]:
        """Return the token usage of a successful response (empty when absent)."""
        return _body_usage(self._body())

    def _body(self) -> dict[str, Any] | None:
        return self.response.body if self.response is not None else None


class ResultOutcome(NamedTuple):
    """
    What one output or error line says about its request: what :class:`ResultLine` reads, in one call.

    :param succeeded: the request got a 2xx response and no error (:attr:`ResultLine.succeeded`).
    :param error_code: :attr:`ResultLine.error_code`.
    :param error_message: :attr:`ResultLine.error_message`.
    :param has_response: the line has a ``response`` object (a request that never ran has none).
    :param body: the response body, or None (:attr:`ResultResponse.body`).
    :param usage: :attr:`ResultLine.usage`.
    """

    succeeded: bool
    error_code: str | None
    error_message: str | None
    has_response: bool
    body: dict[str, Any] | None
    usage: dict[str, int]


def read_result_line(data: Mapping[str, Any]) -> ResultOutcome:
    """
    Read a parsed output or error line as :class:`ResultLine` does, without building the models.

    The same rules as ``ResultLine.model_validate(data)`` and its properties, for the results join,
    which reads every line of a batch's output: a body that is already a dict is used as it is.

    :param data: one line of an output or error file, parsed from JSON.
    """
    response = data.get("response")
    if type(response) is not dict:
        response = _result_response(response)
    error = data.get("error")
    if error is not None and type(error) is not dict:
        error = _result_error(error)
    status_code: int | None = None
    body: dict[str, Any] | None = None
    if response is not None:
        status_code = response.get("status_code")
        if type(status_code) is not int:
            status_code = _optional_int(status_code)
        raw_body = response.get("body")
        body = raw_body if type(raw_body) is dict else _dict_or_none(raw_body)
    code = message = None
    if error is not None:
        code = _optional_str(error.get("code"))
        message = _optional_str(error.get("message"))
    succeeded = _line_succeeded(code, message, status_code)
    body_error = _body_error(body)
    return ResultOutcome(
        succeeded,
        _line_error_code(code, body_error),
        _line_error_message(message, body_error, response is not None and not succeeded, status_code),
        response is not None,
        body,
        _body_usage(body),
    )


def _line_succeeded(error_code: str | None, error_message: str | None, status_code: int | None) -> bool:
    if error_code or error_message:
        return False
    return status_code is not None and 200 <= status_code < 300


def _body_error(body: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    error = body.get("error") if body else None
    return error if error is not None and (type(error) is dict or isinstance(error, Mapping)) else None


def _line_error_code(error_code: str | None, body_error: Mapping[str, Any] | None) -> str | None:
    if error_code:
        return error_code
    return _optional_str(body_error.get("code") or body_error.get("type")) if body_error else None


def _line_error_message(
    error_message: str | None,
    body_error: Mapping[str, Any] | None,
    failed_response: bool,
    status_code: int | None,
) -> str | None:
    if error_message:
        return error_message
    if body_error:
        return _optional_str(body_error.get("message"))
    if failed_response:
        return f"HTTP {status_code}"
    return None


def _body_usage(body: Mapping[str, Any] | None) -> dict[str, int]:
    usage = body.get("usage") if body else None
    if usage is None or not (type(usage) is dict or isinstance(usage, Mapping)):
        return {}
    return {
        str(k): v
        for k, v in usage.items()
        if type(v) is int or (isinstance(v, int) and not isinstance(v, bool))
    }
