"""
How each vendor answers, as the emulator reproduces it: the facts only the emulator reads.

The client reads every variant for every vendor (lenient reading), so the response shapes below are
not client facts: they say what the emulator produces for a vendor, so that each quirk is exercised
where it was seen. What the client itself must know (paths, limits, error codes, list parameters,
which status a cancel of a finished batch answers with, ...) stays in the vendor registry,
:mod:`airflow_provider_llmbatch.vendors`; the emulator reads both.

One :class:`EmulatorDialect` per vendor in :data:`DIALECTS`, keyed by the registry name. A vendor
without one is answered in the OpenAI dialect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from airflow_provider_llmbatch.vendors import VendorSpec

ResultLineId = Literal["batch_id", "custom_id", "uuid", "batch_request"]
"""What a vendor puts in the ``id`` field of an output line."""

ResultRequestId = Literal["in_body", "empty", "uuid"]
"""Where a vendor puts the request id of an output line: in the body, ``""``, or a fresh uuid."""

ValidationStage = Literal["upload", "create", "async"]
"""Where a vendor rejects a malformed request file: at upload, at create, or after create (``failed``)."""

ErrorBodyField = Literal["code", "message", "type", "param"]


def _frozen() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ResultFormat:
    """
    The shape of a line in a vendor's output and error files.

    :param line_id: what goes in the line's ``id``.
    :param request_id: where the response's request id goes.
    :param error_key_on_success: whether a successful line carries ``"error": null``.
    """

    line_id: ResultLineId
    request_id: ResultRequestId
    error_key_on_success: bool


@dataclass(frozen=True)
class ErrorShape:
    """
    How a vendor shapes an error response; its codes are in the registry (``VendorSpec.errors``).

    :param fields: which keys of the nested ``error`` object the vendor fills; the vendor's code goes in
        ``error.code`` when there is one, else in ``error.type``.
    :param request_id_in_body: whether the body carries a top-level ``request_id``.
    :param sends_retry_after: whether a 429 carries ``Retry-After`` (``None``: unknown, not sent).
    :param type_is_code: error kinds whose ``error.type`` repeats the code, where a body carries both
        (DashScope's ``Arrearage``); the others get the OpenAI family's type words.
    """

    fields: tuple[ErrorBodyField, ...]
    request_id_in_body: bool = False
    sends_retry_after: bool | None = None
    type_is_code: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PageShape:
    """
    How a list endpoint shapes its pages, beyond the parameters the registry's ``ListSpec`` declares.

    :param default_limit: the page size when ``limit`` is not sent.
    :param has_first_last_ids: whether pages carry ``first_id``/``last_id``.
    :param has_more: whether pages carry ``has_more``.
    :param honours_after: whether ``after`` is honoured (a list that ignores it returns everything).
    :param data_null_when_empty: whether an empty page says ``data: null``.
    """

    default_limit: int | None = 20
    has_first_last_ids: bool = True
    has_more: bool = True
    honours_after: bool = True
    data_null_when_empty: bool = False


@dataclass(frozen=True)
class EmulatorDialect:
    """
    What the emulator produces for one vendor: shapes and behaviours, seen or documented.

    :param result_format: the shape of output/error lines.
    :param errors: the shape of error bodies.
    :param batch_pages: the shape of the batch list's pages.
    :param file_pages: the shape of the file list's pages.
    :param timestamps_in_ms: timestamps come in milliseconds.
    :param empty_file_id: what an unset ``output_file_id``/``error_file_id`` looks like.
    :param null_counts_while_validating: ``request_counts`` values are null while validating.
    :param flat_counts: the counts also come at the top level (``total``, ``completed``, ``failed``),
        beside ``request_counts``.
    :param batch_has_errors: whether a batch carries an ``errors`` object.
    :param batch_has_expired_at: whether a batch carries ``expired_at``.
    :param completion_window_echo: what the vendor echoes as ``completion_window`` (None: the request's).
    :param cancel_counts_unfinished_as_failed: whether a cancel counts unfinished requests as failed.
    :param error_file_id_prefix: the prefix of error file ids.
    :param validation_stage: where a malformed request file is rejected.
    :param rate_limits_per_minute: operation -> requests per minute, where documented.
    :param create_field_defaults: what the vendor assumes for a vendor-only create field that is absent.
    """

    result_format: ResultFormat
    errors: ErrorShape
    batch_pages: PageShape = PageShape()
    file_pages: PageShape = PageShape()
    timestamps_in_ms: bool = False
    empty_file_id: Literal["null", "empty_string"] = "null"
    null_counts_while_validating: bool = False
    flat_counts: bool = False
    batch_has_errors: bool = True
    batch_has_expired_at: bool = True
    completion_window_echo: str | None = None
    cancel_counts_unfinished_as_failed: bool = False
    error_file_id_prefix: str = "file-err-"
    validation_stage: ValidationStage = "async"
    rate_limits_per_minute: Mapping[str, int] = field(default_factory=_frozen)
    create_field_defaults: Mapping[str, object] = field(default_factory=_frozen)


ZHIPU = EmulatorDialect(
    result_format=ResultFormat(line_id="batch_id", request_id="in_body", error_key_on_success=False),
    # A 429 without Retry-After is a guess.
    errors=ErrorShape(fields=("code", "message"), sends_retry_after=False),
    # Seen in 2024: millisecond timestamps, "" for unset file ids, null counts while validating.
    timestamps_in_ms=True,
    empty_file_id="empty_string",
    null_counts_while_validating=True,
    # Doc (docs.bigmodel.cn, batch object): flat total/completed/failed beside "request_counts" (typed
    # there as an integer, its meaning unsaid: the emulator keeps the object; the client reads both).
    flat_counts=True,
    # The window is deprecated upstream: whatever is sent, "24h" is echoed.
    completion_window_echo="24h",
    # A guess: a malformed file may already be refused at upload, with a business code.
    validation_stage="upload",
    # Doc: the vendor deletes the input file once the batch is done unless told not to.
    create_field_defaults=MappingProxyType({"auto_delete_input_file": True}),
)

MOONSHOT = EmulatorDialect(
    result_format=ResultFormat(line_id="custom_id", request_id="empty", error_key_on_success=True),
    errors=ErrorShape(fields=("type", "message")),
    batch_pages=PageShape(has_first_last_ids=False),
    # No parameters, no has_more, `after` ignored: a pager must stop on its own.
    file_pages=PageShape(default_limit=None, has_first_last_ids=False, has_more=False, honours_after=False),
    batch_has_errors=False,
    batch_has_expired_at=False,
    validation_stage="create",  # a guess: at create or later
)

DASHSCOPE = EmulatorDialect(
    result_format=ResultFormat(line_id="uuid", request_id="uuid", error_key_on_success=True),
    # Doc (error codes page): an overdue account answers {"code": "Arrearage", "type": "Arrearage", ...}.
    errors=ErrorShape(
        fields=("message", "type", "param", "code"),
        request_id_in_body=True,
        type_is_code=frozenset({"quota_exceeded"}),
    ),
    # Seen: an empty result says `data: null`.
    batch_pages=PageShape(data_null_when_empty=True),
    file_pages=PageShape(data_null_when_empty=True),
    # Seen: unfinished requests of a cancelled batch end up counted as failed.
    cancel_counts_unfinished_as_failed=True,
    # Seen: an error file id that looks like an output file id. Never infer kind from an id.
    error_file_id_prefix="file-batch_output-",
    # Seen: create always answers 200 `validating`; the next read shows `failed` with the problems.
    validation_stage="async",
    rate_limits_per_minute=MappingProxyType({"create": 1000, "retrieve": 1000, "cancel": 1000, "list": 100}),
)

OPENAI = EmulatorDialect(
    result_format=ResultFormat(line_id="batch_request", request_id="uuid", error_key_on_success=True),
    errors=ErrorShape(fields=("message", "type", "param", "code"), sends_retry_after=True),
    error_file_id_prefix="file-",
)

DIALECTS: Mapping[str, EmulatorDialect] = MappingProxyType(
    {"zhipu": ZHIPU, "moonshot": MOONSHOT, "dashscope": DASHSCOPE, "openai": OPENAI}
)
"""Every vendor's dialect by registry name."""


def dialect_of(spec: VendorSpec) -> EmulatorDialect:
    """Return the dialect the emulator answers ``spec``'s vendor in (OpenAI's for a vendor it lacks)."""
    return DIALECTS.get(spec.name, OPENAI)


def emulator_prefix(spec: VendorSpec) -> str:
    """Return the path the emulator serves a vendor under: ``/<name><real path>``."""
    return f"/{spec.name}{urlsplit(spec.default_base_url).path.rstrip('/')}"
