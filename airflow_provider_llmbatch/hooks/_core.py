"""
The I/O-free core of the hook: connection settings, request building, response parsing, paging.

Both faces of :class:`~airflow_provider_llmbatch.hooks.batch.BatchHook` (sync for workers, async for
triggers) build every request and read every response here; they add only the I/O. Everything that
differs between vendors is read from the :class:`~airflow_provider_llmbatch.vendors.VendorSpec`.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import pydantic

from airflow_provider_llmbatch import __version__
from airflow_provider_llmbatch.exceptions import InvalidInputError, MalformedResponseError, VendorAPIError
from airflow_provider_llmbatch.hooks import errors
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.vendors import ExtraCreateField, ListSpec, VendorSpec, vendor_for_conn_type

IDEMPOTENCY_KEY = "llmbatch_idem"
"""Metadata key the hook tags every create with, so a create of unknown effect can be found again."""

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 5
ERROR_BODY_LIMIT = 64 * 1024
"""Bytes of an error body read at most: enough for any message, bounded for a misbehaving proxy."""

USER_AGENT = f"airflow-provider-llmbatch/{__version__}"

M = TypeVar("M", Batch, FileObject)


@dataclass(frozen=True)
class ConnSettings:
    """
    What the hook needs from an Airflow connection.

    :param conn_id: the connection id.
    :param vendor: the vendor spec decided by the connection type.
    :param base_url: the API base URL, without a trailing slash.
    :param api_key: the API key (never in ``repr``).
    :param timeout: seconds per request (per read/write for streams).
    :param max_retries: retries of a failed call that is safe to repeat.
    :param headers: vendor headers from connection fields (never in ``repr``).
    """

    conn_id: str
    vendor: VendorSpec
    base_url: str
    api_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def origin(self) -> str:
        """Return scheme://host[:port] of the base URL: the key of the shared async connection pool."""
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    def request_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the headers of one request; the key travels per request, never in a shared client."""
        headers = {"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT, **self.headers}
        if extra:
            headers.update(extra)
        return headers

    def secret_values(self) -> list[str]:
        """Return the values to mask in logs: the key and secret vendor headers."""
        secret_headers = {f.header for f in self.vendor.conn_fields if f.secret and f.header}
        return [self.api_key, *(v for k, v in self.headers.items() if k in secret_headers)]


def _number(conn_id: str, name: str, value: Any, cast: type[float] | type[int], minimum: float) -> Any:
    try:
        number = cast(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"connection {conn_id!r}: extra {name!r} must be a number, got {value!r}"
        ) from None
    if number < minimum:
        raise InvalidInputError(f"connection {conn_id!r}: extra {name!r} must be >= {minimum}, got {value!r}")
    return number


def settings_from_connection(
    conn_id: str,
    *,
    conn_type: str | None,
    host: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    port: int | None = None,
    timeout: float | None = None,
) -> ConnSettings:
    """
    Read a connection into :class:`ConnSettings`.

    :param conn_id: the connection id, for messages.
    :param conn_type: the connection type; decides the vendor.
    :param host: the base URL, with or without scheme; empty for the registry's URL of extra ``region``.
    :param password: the API key.
    :param extra: the connection's extras.
    :param port: the connection's port, used when ``host`` names none.
    :param timeout: a timeout that overrides the connection's.
    """
    try:
        vendor = vendor_for_conn_type(conn_type)
    except KeyError as exc:
        raise InvalidInputError(f"connection {conn_id!r}: {exc.args[0]}") from None
    if not password:
        raise InvalidInputError(
            f"connection {conn_id!r} has no API key: put the {vendor.display_name} API key in its password"
        )
    region = extra.get("region") or None
    if host and host.strip():
        base_url = host.strip()
        if "://" not in base_url:
            base_url = f"https://{base_url}"
        parts = urlsplit(base_url)
        if port and parts.port is None:
            base_url = parts._replace(netloc=f"{parts.netloc}:{port}").geturl()
    elif region is not None:
        if region not in vendor.base_urls:
            raise InvalidInputError(
                f"connection {conn_id!r}: unknown region {region!r} for {vendor.display_name}; "
                f"use one of: {', '.join(vendor.base_urls)}"
            )
        base_url = vendor.base_urls[str(region)]
    else:
        base_url = vendor.default_base_url
    if timeout is None:
        raw_timeout = extra.get("timeout")
        timeout = (
            DEFAULT_TIMEOUT
            if raw_timeout in (None, "")
            else _number(conn_id, "timeout", raw_timeout, float, 0.001)
        )
    raw_retries = extra.get("max_retries")
    max_retries = (
        DEFAULT_MAX_RETRIES
        if raw_retries in (None, "")
        else _number(conn_id, "max_retries", raw_retries, int, 0)
    )
    headers = {
        f.header: str(extra[f.name])
        for f in vendor.conn_fields
        if f.header and extra.get(f.name) not in (None, "")
    }
    return ConnSettings(
        conn_id=conn_id,
        vendor=vendor,
        base_url=base_url.rstrip("/"),
        api_key=password,
        timeout=float(timeout),
        max_retries=int(max_retries),
        headers=headers,
    )


@dataclass(frozen=True)
class Request:
    """
    One API call, independent of the client that sends it.

    :param operation: the hook operation, for messages and logs.
    :param method: the HTTP method.
    :param path: the path under the base URL.
    :param params: query parameters.
    :param body: a JSON body, already encoded.
    :param idempotent: whether repeating it is harmless whatever its effect.
    """

    operation: str
    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    idempotent: bool = True

    def url(self, settings: ConnSettings) -> str:
        """Return the absolute URL for the connection's base URL."""
        return settings.base_url + self.path

    def headers(self) -> dict[str, str]:
        """Return the content headers of the body, if any."""
        return {"Content-Type": "application/json"} if self.body is not None else {}


def _segment(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
    return quote(value, safe="")


@dataclass(frozen=True)
class MultipartLayout:
    """
    The bytes around a streamed file in a ``multipart/form-data`` upload.

    :param boundary: the multipart boundary.
    :param head: the form fields and the file part's headers.
    :param tail: the closing boundary.
    """

    boundary: str
    head: bytes
    tail: bytes

    @property
    def content_type(self) -> str:
        """Return the request's Content-Type header."""
        return f"multipart/form-data; boundary={self.boundary}"

    def content_length(self, size: int | None) -> int | None:
        """Return the request's length for a file of ``size`` bytes, or None when the size is unknown."""
        return None if size is None else len(self.head) + size + len(self.tail)


def _form_quote(value: str) -> str:
    # As browsers (and httpx) do: escape what would end the quoted string.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_layout(
    fields: Mapping[str, str], *, filename: str, boundary: str | None = None
) -> MultipartLayout:
    """
    Return the multipart framing of an upload: the form ``fields`` first, then the file as ``file``.

    :param fields: plain form fields (``purpose``).
    :param filename: the file name sent to the vendor.
    :param boundary: a fixed boundary, for tests.
    """
    boundary = boundary or uuid.uuid4().hex
    head = bytearray()
    for name, value in fields.items():
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="{_form_quote(name)}"\r\n\r\n'.encode()
        head += f"{value}\r\n".encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_form_quote(filename)}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return MultipartLayout(boundary=boundary, head=bytes(head), tail=f"\r\n--{boundary}--\r\n".encode())


class Pager:
    """
    The state of one paged listing; ends on ``has_more`` false or absent, a stuck cursor or a repeated page.

    :param spec: how the vendor's list endpoint pages.
    :param filters: query parameters besides ``after``/``limit``.
    :param page_size: the requested page size (capped at the vendor's maximum).
    """

    def __init__(self, spec: ListSpec, filters: Mapping[str, str], page_size: int | None) -> None:
        self._spec = spec
        self._filters = dict(filters)
        self._limit = None
        if page_size is not None and spec.max_limit is not None and "limit" in spec.params:
            self._limit = min(page_size, spec.max_limit)
        self._cursor: str | None = None
        self._seen: set[str] = set()
        self.done = False
        self.pages = 0

    def params(self) -> dict[str, str]:
        """Return the query parameters of the next page."""
        params = dict(self._filters)
        if self._limit is not None:
            params["limit"] = str(self._limit)
        if self._cursor is not None and "after" in self._spec.params:
            params["after"] = self._cursor
        return params

    def feed(self, page: Page[M]) -> list[M]:
        """Return the items of ``page`` not seen before, and decide whether another page follows."""
        self.pages += 1
        fresh = [item for item in page.data if item.id not in self._seen]
        self._seen.update(item.id for item in fresh)
        cursor = page.last_id or (page.data[-1].id if page.data else None)
        # A vendor that ignores `after` repeats itself; one without has_more never says stop.
        stuck = cursor is None or cursor == self._cursor or "after" not in self._spec.params
        if not page.has_more or not fresh or stuck:
            self.done = True
        self._cursor = cursor
        return fresh


class Core:
    """
    Build requests and read responses for one connection; no I/O.

    :param settings: the connection's settings.
    """

    def __init__(self, settings: ConnSettings) -> None:
        self.settings = settings
        self.vendor = settings.vendor

    # -- requests ---------------------------------------------------------------------------------

    def upload(self) -> Request:
        """Return the upload request (its multipart body is streamed by the face)."""
        return Request("upload_file", "POST", "/files", idempotent=False)

    def get_file(self, file_id: str) -> Request:
        """Return the request that reads a file object."""
        return Request("get_file", "GET", f"/files/{_segment('file_id', file_id)}")

    def delete_file(self, file_id: str) -> Request:
        """Return the request that deletes a file."""
        return Request("delete_file", "DELETE", f"/files/{_segment('file_id', file_id)}")

    def file_content(self, file_id: str, operation: str = "download_file") -> Request:
        """Return the request that streams a file's content."""
        return Request(operation, "GET", f"/files/{_segment('file_id', file_id)}/content")

    def get_batch(self, batch_id: str) -> Request:
        """Return the request that reads a batch."""
        return Request("get_batch", "GET", f"/batches/{_segment('batch_id', batch_id)}")

    def cancel_batch(self, batch_id: str) -> Request:
        """Return the request that cancels a batch (repeating a cancel is harmless)."""
        return Request("cancel_batch", "POST", f"/batches/{_segment('batch_id', batch_id)}/cancel")

    def list_request(self, kind: str, params: Mapping[str, str]) -> Request:
        """Return the request of one list page (``kind``: ``files`` or ``batches``)."""
        return Request(f"list_{kind}", "GET", f"/{kind}", params=dict(params))

    @staticmethod
    def _filter_value(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list | tuple | set | frozenset):
            return ",".join(str(v) for v in value)
        return str(value)

    def _pager(self, spec: ListSpec, what: str, page_size: int | None, filters: Mapping[str, Any]) -> Pager:
        if page_size is not None and (not isinstance(page_size, int) or page_size < 1):
            raise InvalidInputError(f"page_size must be a positive integer, got {page_size!r}")
        allowed = sorted(spec.params - {"after", "limit"})
        unknown = sorted(k for k in filters if k not in allowed)
        if unknown:
            raise InvalidInputError(
                f"{self.vendor.display_name} {what} list does not accept filter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        params = {k: self._filter_value(v) for k, v in filters.items() if v is not None}
        return Pager(spec, params, page_size)

    def batch_pager(self, page_size: int | None, filters: Mapping[str, Any]) -> Pager:
        """Return a pager over batches; unknown filters raise :class:`InvalidInputError`."""
        return self._pager(self.vendor.batch_list, "batch", page_size, filters)

    def file_pager(self, page_size: int | None, purpose: str | None, filters: Mapping[str, Any]) -> Pager:
        """Return a pager over files; ``purpose`` is sent where the vendor filters by it."""
        if purpose is not None and "purpose" in self.vendor.file_list.params:
            filters = {**filters, "purpose": purpose}
        return self._pager(self.vendor.file_list, "file", page_size, filters)

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str | None,
        completion_window: str | None,
        metadata: Mapping[str, str] | None,
        extra: Mapping[str, Any] | None,
        idempotency_key: str | None = None,
    ) -> tuple[Request, str | None]:
        """
        Return the create request and the idempotency key it carries (None when there is no room for one).

        Everything is checked against the vendor spec before anything is sent.

        :param input_file_id: the uploaded request file.
        :param endpoint: the batch endpoint (default: the vendor's first).
        :param completion_window: the window (default: the vendor's; null where the vendor ignores it).
        :param metadata: the user's metadata.
        :param extra: vendor-only fields (``spec.extra_create_fields``).
        :param idempotency_key: a fixed key, for tests; else taken from ``metadata`` or generated.
        """
        _segment("input_file_id", input_file_id)
        body, merged = create_arguments(
            self.vendor,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            extra=extra,
        )
        key: str | None = idempotency_key or merged.get(IDEMPOTENCY_KEY)
        if key is None and len(merged) < self.vendor.limits.metadata_pairs:
            key = uuid.uuid4().hex
        if key is not None:
            merged[IDEMPOTENCY_KEY] = key
        check_metadata(self.vendor, merged)
        body = {"input_file_id": input_file_id, **body}
        if merged:
            body["metadata"] = merged
        request = Request(
            "create_batch", "POST", "/batches", body=json.dumps(body).encode(), idempotent=False
        )
        return request, key

    # -- responses --------------------------------------------------------------------------------

    def error(
        self, request: Request, status: int, reason: str, headers: Mapping[str, str], content: bytes
    ) -> VendorAPIError:
        """Return the typed exception for an error response to ``request``."""
        return errors.error_from_response(
            self.vendor,
            status=status,
            reason=reason,
            headers=headers,
            content=content,
            conn_id=self.settings.conn_id,
            operation=request.operation,
            secret=self.settings.api_key,
        )

    def _json(self, request: Request, status: int, headers: Mapping[str, str], content: bytes) -> Any:
        try:
            return json.loads(content)
        except (ValueError, RecursionError):
            raise self._malformed(
                request, status, headers, f"the {request.operation} response is not JSON"
            ) from None

    def _malformed(
        self, request: Request, status: int, headers: Mapping[str, str], what: str
    ) -> MalformedResponseError:
        return errors.malformed(
            what,
            vendor=self.vendor,
            conn_id=self.settings.conn_id,
            operation=request.operation,
            status=status,
            request_id=errors.redact(
                errors.request_id_from(self.vendor, headers, None) or "", self.settings.api_key
            )
            or None,
        )

    def parse(
        self, request: Request, status: int, headers: Mapping[str, str], content: bytes, model: type[M]
    ) -> M:
        """Return the response as ``model``; a body that is not one raises :class:`MalformedResponseError`."""
        data = self._json(request, status, headers, content)
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            summary = errors.summarize_validation(exc)
            raise self._malformed(
                request,
                status,
                headers,
                f"the {request.operation} response is not a {model.__name__}: {summary}",
            ) from None

    def parse_page(
        self, request: Request, status: int, headers: Mapping[str, str], content: bytes, model: type[M]
    ) -> Page[M]:
        """Return the response as a page of ``model``; items without an id are skipped, not fatal."""
        data = self._json(request, status, headers, content)
        if not isinstance(data, Mapping):
            raise self._malformed(
                request, status, headers, f"the {request.operation} response is not an object"
            )
        items = data.get("data")
        valid: list[Any] = []
        for item in items if isinstance(items, list) else []:
            try:
                valid.append(model.model_validate(item))
            except pydantic.ValidationError:
                continue
        try:
            page = Page[model].model_validate({**data, "data": []})  # type: ignore[valid-type]
        except pydantic.ValidationError as exc:
            summary = errors.summarize_validation(exc)
            raise self._malformed(
                request, status, headers, f"the {request.operation} page is malformed: {summary}"
            ) from None
        return page.model_copy(update={"data": valid})


def create_arguments(
    vendor: VendorSpec,
    *,
    endpoint: str | None,
    completion_window: str | None,
    metadata: Mapping[str, str] | None,
    extra: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """
    Check create-batch arguments against the vendor's spec; return the body fields and the merged metadata.

    The body holds ``endpoint``, ``completion_window`` and the vendor's extra fields; fields the vendor
    carries inside ``metadata`` (DashScope ``ds_*``) are merged into the returned metadata instead.

    :raises InvalidInputError: naming the argument and what the vendor accepts.
    """
    endpoint = endpoint or vendor.default_endpoint
    if vendor.endpoint(endpoint) is None:
        allowed = ", ".join(e.path for e in vendor.endpoints)
        raise InvalidInputError(
            f"{vendor.display_name} does not accept endpoint {endpoint!r}; use one of: {allowed}"
        )
    rule = vendor.completion_window
    window = completion_window if completion_window is not None else rule.default
    problem = rule.check(window)
    if problem:
        raise InvalidInputError(f"completion_window for {vendor.display_name}: {problem}")
    merged: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInputError(f"metadata must map strings to strings, got {name!r}: {value!r}")
        merged[name] = value
    body: dict[str, Any] = {"endpoint": endpoint, "completion_window": window}
    fields = {f.name: f for f in vendor.extra_create_fields}
    for name, value in (extra or {}).items():
        spec = fields.get(name)
        if spec is None:
            allowed = ", ".join(fields) or "none"
            raise InvalidInputError(f"{vendor.display_name} has no create field {name!r}; allowed: {allowed}")
        _check_extra_type(spec, value)
        if spec.in_metadata:
            if name in merged and merged[name] != value:
                raise InvalidInputError(f"{name!r} is given both in metadata and in extra, differently")
            merged[name] = value
        else:
            body[name] = value
    return body, merged


def check_metadata(vendor: VendorSpec, metadata: Mapping[str, str]) -> None:
    """
    Check metadata against the vendor's pair, key and value limits.

    :raises InvalidInputError: naming the key and the limit.
    """
    limits = vendor.limits
    if len(metadata) > limits.metadata_pairs:
        raise InvalidInputError(
            f"{vendor.display_name} accepts at most {limits.metadata_pairs} metadata pairs, "
            f"got {len(metadata)}"
        )
    for k, v in metadata.items():
        if not k or len(k) > limits.metadata_key_chars:
            raise InvalidInputError(
                f"metadata key {k!r}: expected 1 to {limits.metadata_key_chars} characters, got {len(k)}"
            )
        most = limits.metadata_value_chars_by_key.get(k, limits.metadata_value_chars)
        if len(v) > most:
            raise InvalidInputError(
                f"metadata value of {k!r}: expected at most {most} characters, got {len(v)}"
            )


def check_create_args(
    vendor: VendorSpec,
    *,
    endpoint: str | None = None,
    completion_window: str | None = None,
    metadata: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """
    Check create-batch arguments before anything is uploaded, exactly as ``create_batch`` will.

    :raises InvalidInputError: naming the argument and what the vendor accepts.
    """
    _, merged = create_arguments(
        vendor, endpoint=endpoint, completion_window=completion_window, metadata=metadata, extra=extra
    )
    check_metadata(vendor, merged)


def _check_extra_type(spec: ExtraCreateField, value: Any) -> None:
    ok = {
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
        "object": isinstance(value, Mapping),
        "integer": isinstance(value, int) and not isinstance(value, bool),
    }[spec.type]
    if not ok:
        raise InvalidInputError(
            f"create field {spec.name!r} expects a {spec.type}, got {type(value).__name__}"
        )


def source_name(source: object, default: str = "input.jsonl") -> str:
    """Return the file name to upload a source under: its base name, else ``default``."""
    if isinstance(source, str | os.PathLike):
        return os.path.basename(os.fspath(source)) or default
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return os.path.basename(name) or default
    return default
