"""
The shape of a vendor's entry in the registry: :class:`VendorSpec` and the facts it is made of.

The facts themselves, one spec per vendor, are in :mod:`airflow_provider_llmbatch.vendors`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from airflow_provider_llmbatch.schema import StructuredOutputSpec

ErrorKind = Literal[
    "bad_request",
    "authentication",
    "permission_denied",
    "not_found",
    "conflict",
    "file_too_large",
    "rate_limit",
    "quota_exceeded",
    "server",
]
"""The closed set of API error kinds; the hook maps each one to an exception class."""

_WINDOW_RE = re.compile(r"^(\d+)([hd])$")


def _frozen() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class EndpointSpec:
    """
    One batch endpoint a vendor accepts: the ``endpoint`` of a batch and the ``url`` of each request line.

    :param path: the value as the vendor spells it, e.g. ``/v4/chat/completions``.
    :param kind: what the endpoint does: how request bodies are built, how the emulator answers.
    :param max_requests: a tighter per-file request limit than the vendor's, if any.
    :param max_file_bytes: a tighter per-file byte limit than the vendor's, if any.
    :param required_model: the only model the endpoint accepts, if it has one.
    """

    path: str
    kind: Literal["chat", "embeddings", "images", "responses", "completions", "test"]
    max_requests: int | None = None
    max_file_bytes: int | None = None
    required_model: str | None = None


@dataclass(frozen=True)
class CompletionWindowRule:
    """
    What a vendor accepts as ``completion_window``.

    :param min_hours: the shortest window accepted.
    :param max_hours: the longest window accepted.
    :param default: what the provider sends when the user gives nothing (``None`` sends null).
    :param ignored: True where the vendor ignores the value (it may be sent as null).
    :param units: the unit letters accepted after the number (``"h"``, ``"d"``).
    """

    min_hours: int
    max_hours: int
    default: str | None
    ignored: bool = False
    units: str = "hd"

    def check(self, window: str | None) -> str | None:
        """Return an explanation of why ``window`` is not accepted, or None if it is."""
        if window is None:
            return None
        match = _WINDOW_RE.match(window)
        if not match or match.group(2) not in self.units:
            units = " or ".join(f"'<n>{u}'" for u in self.units)
            return f"expected a window like {units}, got {window!r}"
        hours = int(match.group(1)) * (24 if match.group(2) == "d" else 1)
        if self.ignored:
            return None
        if not self.min_hours <= hours <= self.max_hours:
            return f"expected a window from {self.min_hours}h to {self.max_hours}h, got {window!r} ({hours}h)"
        return None

    @staticmethod
    def hours(window: str | None) -> int | None:
        """Return the window in hours, or None when it is not a ``<n>h``/``<n>d`` string."""
        match = _WINDOW_RE.match(window or "")
        if not match:
            return None
        return int(match.group(1)) * (24 if match.group(2) == "d" else 1)


@dataclass(frozen=True)
class Limits:
    """
    Per-file and per-account limits of a vendor's Batch API.

    :param max_requests: requests (lines) in one file.
    :param max_file_bytes: bytes in one file.
    :param max_line_bytes: bytes in one line, where the vendor has such a limit.
    :param max_batch_files: batch files (``purpose=batch``) an account may keep, where documented.
    :param metadata_pairs: key/value pairs in a batch's ``metadata``.
    :param metadata_key_chars: characters in a metadata key.
    :param metadata_value_chars: characters in a metadata value.
    :param metadata_value_chars_by_key: tighter limits for given keys (DashScope ``ds_*``).
    """

    max_requests: int
    max_file_bytes: int
    max_line_bytes: int | None = None
    max_batch_files: int | None = None
    metadata_pairs: int = 16
    metadata_key_chars: int = 64
    metadata_value_chars: int = 512
    metadata_value_chars_by_key: Mapping[str, int] = field(default_factory=_frozen)


@dataclass(frozen=True)
class ExtraCreateField:
    """
    A vendor-only field of the create-batch body.

    :param name: the field name as sent.
    :param type: the JSON type expected.
    :param description: what it does, for docs and forms.
    :param in_metadata: True where the field travels inside ``metadata`` (DashScope ``ds_*``).
    """

    name: str
    type: Literal["boolean", "string", "object", "integer"]
    description: str
    in_metadata: bool = False


@dataclass(frozen=True)
class ConnField:
    """
    A connection-form field stored in ``Connection.extra``.

    :param name: the key in ``extra``.
    :param label: the form label.
    :param description: the help text.
    :param type: the JSON-schema type.
    :param default: the form's default value.
    :param enum: allowed values, if closed.
    :param header: an HTTP header this value is sent in, if any.
    :param secret: True to mask the value in the form and in logs.
    """

    name: str
    label: str
    description: str
    type: Literal["string", "number", "integer", "boolean"] = "string"
    default: object = None
    enum: tuple[str, ...] | None = None
    header: str | None = None
    secret: bool = False


@dataclass(frozen=True)
class ListSpec:
    """
    How a vendor's list endpoint pages and filters.

    :param params: the query parameters it accepts, pagination included.
    :param max_limit: the largest ``limit`` accepted (``None``: no ``limit`` parameter).
    :param time_params: the filters that take a point in time.
    :param time_format: how those are written (``strftime``); text is accepted only as the format writes
        it (every field zero-padded, no spaces).
    :param time_zone: the UTC offset, in hours, those are read in.
    """

    params: frozenset[str]
    max_limit: int | None = 100
    time_params: frozenset[str] = frozenset()
    time_format: str = ""
    time_zone: float = 0.0

    @property
    def tzinfo(self) -> timezone:
        """Return the time zone the time filters are read in."""
        return timezone(timedelta(hours=self.time_zone))

    def time_example(self) -> str:
        """Return a time filter value as the vendor writes it (31 January 2026, 08:00 in its zone)."""
        return datetime(2026, 1, 31, 8, 0, tzinfo=self.tzinfo).strftime(self.time_format)

    def parse_time(self, value: str) -> datetime | None:
        """Return a time filter value as an aware datetime, or None when it is not in ``time_format``."""
        try:
            parsed = datetime.strptime(value, self.time_format)
        except ValueError:
            return None
        # strptime also takes "1" and " 1" for "01": only the text the format writes back is the vendor's.
        if parsed.strftime(self.time_format) != value:
            return None
        return parsed.replace(tzinfo=self.tzinfo)


@dataclass(frozen=True)
class CodeDoc:
    """
    Where a vendor documents one error code, and what its table says the code means.

    :param status: the HTTP status the vendor's table gives the code (None: its table gives none).
    :param meaning: the vendor's meaning, in short.
    :param source: the URL of the vendor's error-code page.
    :param documented: False where the code is ours, not the vendor's (the emulator needs one where the
        vendor documents the HTTP status only); ``meaning`` then says why.
    """

    status: int | None
    meaning: str
    source: str
    documented: bool = True

    @classmethod
    def table(
        cls, source: str, rows: Mapping[str, tuple[int | None, str] | tuple[int | None, str, bool]]
    ) -> Mapping[str, CodeDoc]:
        """Return code -> :class:`CodeDoc` for rows ``code: (status, meaning[, documented])`` of one page."""
        return MappingProxyType({code: cls(row[0], row[1], source, *row[2:]) for code, row in rows.items()})


@dataclass(frozen=True)
class ErrorDialect:
    """
    What a vendor's error responses mean.

    :param request_id_headers: response headers that may carry the request id.
    :param codes: the vendor's ``(HTTP status, code)`` for each error kind; the code comes in
        ``error.code`` or ``error.type``.
    :param code_kinds: vendor codes or types that override the HTTP status's kind
        (e.g. Zhipu's 429 with code 1113 means arrears, not a rate limit: never retry it).
    :param retryable_codes: error codes of a failed request (in an error file) worth sending again:
        rate limits, overload, server faults. A request rejected for what it is (invalid, filtered, too
        long) is never resubmitted.
    :param retryable_prefixes: code families worth sending again, as the prefix every code of the family
        starts with (DashScope ``Throttling.``): members the vendor's table does not list are matched too.
    :param code_table: every code above -> where the vendor documents it (:class:`CodeDoc`).
    """

    request_id_headers: tuple[str, ...]
    codes: Mapping[ErrorKind, tuple[int, str]]
    code_kinds: Mapping[str, ErrorKind] = field(default_factory=_frozen)
    retryable_codes: frozenset[str] = frozenset()
    retryable_prefixes: tuple[str, ...] = ()
    code_table: Mapping[str, CodeDoc] = field(default_factory=_frozen)

    def is_retryable(self, code: str) -> bool:
        """Return whether a failed request's error code is worth sending again: listed, or in a family."""
        return code in self.retryable_codes or code.startswith(self.retryable_prefixes)


@dataclass(frozen=True)
class VendorSpec:
    """
    Everything that differs about one vendor's Batch API.

    :param name: the registry key, e.g. ``zhipu``.
    :param display_name: the name shown to users.
    :param base_urls: region name -> base URL; the first is the default.
    :param endpoints: the batch endpoints accepted; the first is the default.
    :param completion_window: what ``completion_window`` may be.
    :param limits: per-file and metadata limits.
    :param forbidden_body_keys: request-body keys the vendor rejects in batch lines.
    :param extra_create_fields: vendor-only create fields.
    :param batch_list: how batches are listed.
    :param file_list: how files are listed.
    :param errors: what error codes mean and where the request id is.
    :param cancel_terminal_status: the HTTP status a cancel of an already finished batch answers with.
    :param input_content_downloadable: whether ``GET /files/{id}/content`` serves request (input) files.
    :param console_urls: region -> URL template of the vendor's console page for a batch
        (``{batch_id}``); a region without one gets no link (another region's console is another account).
    :param conn_fields: vendor-only connection fields (beyond the shared ones).
    :param structured_output: how chat requests ask for structured output (None: the vendor has none,
        and ``output_schema`` is refused).
    """

    name: str
    display_name: str
    base_urls: Mapping[str, str]
    endpoints: tuple[EndpointSpec, ...]
    completion_window: CompletionWindowRule
    limits: Limits
    errors: ErrorDialect
    batch_list: ListSpec
    file_list: ListSpec
    forbidden_body_keys: frozenset[str] = frozenset()
    extra_create_fields: tuple[ExtraCreateField, ...] = ()
    cancel_terminal_status: int = 400
    input_content_downloadable: bool = True
    console_urls: Mapping[str, str] = field(default_factory=_frozen)
    conn_fields: tuple[ConnField, ...] = ()
    structured_output: StructuredOutputSpec | None = None

    @property
    def conn_type(self) -> str:
        """Return the Airflow connection type, namespaced so no other provider collides."""
        return f"llmbatch_{self.name}"

    @property
    def default_base_url(self) -> str:
        """Return the base URL of the first (default) region."""
        return next(iter(self.base_urls.values()))

    @property
    def default_endpoint(self) -> str:
        """Return the endpoint used when none is given."""
        return self.endpoints[0].path

    @property
    def default_region(self) -> str:
        """Return the region used when the connection names none."""
        return next(iter(self.base_urls))

    @property
    def console_url(self) -> str:
        """Return the console URL template of the default region (``""``: none)."""
        return self.console_url_for(None)

    def console_url_for(self, region: str | None) -> str:
        """Return the console URL template of ``region`` (None: the default one), or ``""`` without one."""
        return self.console_urls.get(self.default_region if region is None else region, "")

    def region_of(self, base_url: str) -> str | None:
        """Return the region whose base URL has the host of ``base_url``, or None for another host."""
        host = urlsplit(base_url if "://" in base_url else f"https://{base_url}").hostname
        return next((r for r, url in self.base_urls.items() if urlsplit(url).hostname == host), None)

    def endpoint(self, path: str) -> EndpointSpec | None:
        """Return the spec of an endpoint, or None if the vendor does not accept it."""
        return next((e for e in self.endpoints if e.path == path), None)

    def all_conn_fields(self) -> tuple[ConnField, ...]:
        """Return the shared connection fields followed by this vendor's own."""
        region = ConnField(
            name="region",
            label="Region",
            description="Which of the vendor's regional base URLs to use when Base URL is empty.",
            enum=tuple(self.base_urls),
            default=next(iter(self.base_urls)),
        )
        return (region, *SHARED_CONN_FIELDS, *self.conn_fields)


SHARED_CONN_FIELDS: tuple[ConnField, ...] = (
    ConnField(
        name="timeout",
        label="Timeout (seconds)",
        description="Per-request timeout for API calls; uploads and downloads use it per read/write.",
        type="number",
        default=60.0,
    ),
    ConnField(
        name="max_retries",
        label="Max retries",
        description="Retries of a failed call that is safe to repeat (connect errors, 429, 5xx).",
        type="integer",
        default=5,
    ),
)
