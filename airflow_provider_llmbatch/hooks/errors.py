"""
From an HTTP error response (or a transport failure) to a typed exception, by table.

The HTTP status gives a first kind (:data:`STATUS_KINDS`); the vendor's own codes then refine it from
its :class:`~airflow_provider_llmbatch.vendors.ErrorDialect` (``code_kinds`` first, then the
``(status, code)`` pairs of ``codes``). Bodies are read leniently: a nested ``error`` object, a flat
``code``/``message`` object, or an HTML/text page. The API key never reaches a message: any
occurrence in the vendor's text is replaced by ``***``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import pydantic

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    Effect,
    FileTooLargeError,
    MalformedResponseError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    VendorAPIError,
)
from airflow_provider_llmbatch.retry import parse_retry_after
from airflow_provider_llmbatch.vendors import ErrorKind, VendorSpec

STATUS_KINDS: Mapping[int, ErrorKind] = {
    400: "bad_request",
    401: "authentication",
    403: "permission_denied",
    404: "not_found",
    409: "conflict",
    413: "file_too_large",
    422: "bad_request",
    429: "rate_limit",
}
"""HTTP status -> error kind, before the vendor's codes refine it; any 5xx is ``server``."""

KIND_EXCEPTIONS: Mapping[ErrorKind, type[VendorAPIError]] = {
    "bad_request": BadRequestError,
    "authentication": AuthenticationError,
    "permission_denied": PermissionDeniedError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "file_too_large": FileTooLargeError,
    "rate_limit": RateLimitError,
    "quota_exceeded": QuotaExceededError,
    "server": ServerError,
}
"""Error kind -> exception class."""

_MAX_MESSAGE = 500
_TEXT_SNIPPET = 200
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class ErrorBody:
    """
    What an error response said, read leniently.

    :param code: the vendor's error code, if any.
    :param type: the vendor's error type, if any.
    :param message: the vendor's message (or a text snippet), key redacted.
    :param param: the offending parameter, if named.
    :param request_id: the request id from the body, if any.
    """

    code: str | None = None
    type: str | None = None
    message: str | None = None
    param: str | None = None
    request_id: str | None = None


def secret_forms(secret: str) -> list[str]:
    """Return every form in which ``secret`` can reach a message: as is, escaped (repr, JSON), URL-quoted."""
    forms = {
        secret,
        repr(secret)[1:-1],
        json.dumps(secret)[1:-1],
        quote(secret, safe=""),
        repr(secret.encode())[2:-1],
    }
    return sorted((f for f in forms if f), key=len, reverse=True)


def redact(text: str, secret: str | None) -> str:
    """Return ``text`` with every form of ``secret`` (see :func:`secret_forms`) replaced by ``***``."""
    if secret:
        for form in secret_forms(secret):
            text = text.replace(form, "***")
    return text


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def parse_error_body(content: bytes, *, reason: str, secret: str | None) -> ErrorBody:
    """
    Read an error response body in any of the vendors' shapes.

    :param content: the body (possibly truncated).
    :param reason: the HTTP reason phrase, used when the body is not JSON.
    :param secret: the API key, redacted from everything returned.
    """
    try:
        body: Any = json.loads(content) if content.strip() else None
    except (ValueError, RecursionError):
        body = None
        # Redact before cutting, so a key straddling the cut cannot leak its first half.
        text = redact(_WS.sub(" ", content.decode("utf-8", errors="replace")).strip(), secret)
        snippet = f"{reason}: {text[:_TEXT_SNIPPET]}" if text else reason
        return ErrorBody(message=redact(snippet, secret))
    if not isinstance(body, Mapping):
        return ErrorBody(message=reason or None)
    nested = body.get("error")
    source: Mapping[str, Any] = nested if isinstance(nested, Mapping) else body
    message: str | None = _scalar(source.get("message")) or _scalar(source.get("msg"))
    if message is None and isinstance(nested, str):
        message = _scalar(nested)
    request_id = _scalar(body.get("request_id")) or _scalar(source.get("request_id"))
    return ErrorBody(
        code=_scalar(source.get("code")),
        type=_scalar(source.get("type")),
        message=redact(message, secret)[:_MAX_MESSAGE] if message else (reason or None),
        param=_scalar(source.get("param")),
        request_id=redact(request_id, secret) if request_id else None,
    )


def error_kind(vendor: VendorSpec, status: int, body: ErrorBody, *, operation: str = "") -> ErrorKind | None:
    """
    Return the kind of an error response: the vendor's codes first, then the HTTP status.

    :param vendor: the vendor spec whose error dialect applies.
    :param status: the HTTP status.
    :param body: the parsed error body.
    :param operation: the hook operation; a cancel refused with the vendor's "already finished" status
        is a conflict.
    """
    dialect = vendor.errors
    for value in (body.code, body.type):
        if value is not None and value in dialect.code_kinds:
            return dialect.code_kinds[value]
    for value in (body.code, body.type):
        if value is None:
            continue
        pairs = [kind for kind, (s, c) in dialect.codes.items() if s == status and c == value]
        if len(set(pairs)) == 1:
            return pairs[0]
    if operation == "cancel_batch" and status == vendor.cancel_terminal_status and status != 404:
        return "conflict"
    if status in STATUS_KINDS:
        return STATUS_KINDS[status]
    if status >= 500:
        return "server"
    by_status = {kind for kind, (s, _c) in dialect.codes.items() if s == status}
    if len(by_status) == 1:
        return by_status.pop()
    if 400 <= status < 500:
        return "bad_request"
    return None


def request_id_from(vendor: VendorSpec, headers: Mapping[str, str], body: ErrorBody | None) -> str | None:
    """Return the request id from the body, or else from the vendor's request-id headers."""
    if body is not None and body.request_id:
        return body.request_id
    for name in vendor.errors.request_id_headers:
        value = headers.get(name)
        if value:
            return value
    return None


def error_from_response(
    vendor: VendorSpec,
    *,
    status: int,
    reason: str,
    headers: Mapping[str, str],
    content: bytes,
    conn_id: str,
    operation: str,
    secret: str | None,
) -> VendorAPIError:
    """
    Return the typed exception for an HTTP error response.

    :param vendor: the vendor spec.
    :param status: the HTTP status.
    :param reason: the HTTP reason phrase.
    :param headers: the response headers (case-insensitive).
    :param content: the (possibly truncated) body.
    :param conn_id: the Airflow connection id.
    :param operation: the hook operation.
    :param secret: the API key, never to appear in the result.
    """
    # The reason phrase and the headers come from the server as much as the body does: a proxy may echo.
    reason = redact(reason, secret)
    body = parse_error_body(content, reason=reason, secret=secret)
    kind = error_kind(vendor, status, body, operation=operation)
    cls = KIND_EXCEPTIONS[kind] if kind is not None else VendorAPIError
    message = body.message or reason or f"HTTP {status}"
    if body.param:
        message = f"{message} [param: {redact(body.param, secret)}]"
    code = body.code or body.type
    retry_after = parse_retry_after(headers) if cls is RateLimitError or status == 503 else None
    return cls(
        message,
        vendor=vendor.name,
        conn_id=conn_id,
        operation=operation,
        status_code=status,
        code=redact(code, secret) if code else None,
        request_id=redact(request_id_from(vendor, headers, body) or "", secret) or None,
        retry_after=retry_after,
    )


TRANSPORT_ERRORS: tuple[tuple[type[BaseException], type[APIConnectionError], Effect | None], ...] = (
    # Before a byte of the request left: any call may be repeated.
    (httpx.ConnectTimeout, APITimeoutError, "not_sent"),
    (httpx.PoolTimeout, APITimeoutError, "not_sent"),
    (httpx.ConnectError, APIConnectionError, "not_sent"),
    (httpx.ProxyError, APIConnectionError, "not_sent"),
    (aiohttp.ConnectionTimeoutError, APITimeoutError, "not_sent"),
    (aiohttp.ClientHttpProxyError, APIConnectionError, "not_sent"),  # the proxy refused the tunnel
    (aiohttp.ClientConnectorError, APIConnectionError, "not_sent"),
    # After (part of) the request was sent: the vendor may have acted on it.
    (httpx.TimeoutException, APITimeoutError, "unknown"),
    (httpx.NetworkError, APIConnectionError, "unknown"),
    (httpx.RemoteProtocolError, APIConnectionError, "unknown"),
    (TimeoutError, APITimeoutError, "unknown"),
    (aiohttp.ClientPayloadError, APIConnectionError, "unknown"),
    (aiohttp.ServerDisconnectedError, APIConnectionError, "unknown"),
    # The connection dropped while the request was being written (httpx: WriteError, a NetworkError).
    (aiohttp.ClientConnectionResetError, APIConnectionError, "unknown"),
    (aiohttp.ClientOSError, APIConnectionError, "unknown"),
    (aiohttp.ClientResponseError, APIConnectionError, "unknown"),
    # Anything else (a request that could not be built, an invalid URL): repeating will not help.
    (httpx.HTTPError, APIConnectionError, None),
    (aiohttp.ClientError, APIConnectionError, None),
)
"""Transport failure of either face -> (exception class, whether the vendor may have acted); first match."""


def transport_error(
    exc: BaseException, *, vendor: VendorSpec, conn_id: str, operation: str, secret: str | None
) -> APIConnectionError:
    """
    Return the typed exception for a failure without a (complete) response; raise it ``from None``.

    The cause is not chained: a transport library's exception may hold the request and its headers.

    :param exc: an httpx or aiohttp transport error, or a timeout.
    :param vendor: the vendor spec.
    :param conn_id: the Airflow connection id.
    :param operation: the hook operation.
    :param secret: the API key, never to appear in the result.
    """
    cls, effect = next(
        ((c, e) for kind, c, e in TRANSPORT_ERRORS if isinstance(exc, kind)), (APIConnectionError, None)
    )
    detail = redact(str(exc), secret) or type(exc).__name__
    return cls(
        f"{type(exc).__name__}: {detail}",
        vendor=vendor.name,
        conn_id=conn_id,
        operation=operation,
        effect=effect,
    )


def summarize_validation(exc: pydantic.ValidationError, *, limit: int = 5) -> str:
    """Return pydantic's errors as one line of ``location: message``, never the input values."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:limit]:
        location = ".".join(str(p) for p in error.get("loc", ())) or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def malformed(
    what: str, *, vendor: VendorSpec, conn_id: str, operation: str, status: int, request_id: str | None
) -> MalformedResponseError:
    """
    Return the exception for a 2xx response whose body is not what the API promises.

    :param what: what was wrong, without the body.
    :param vendor: the vendor spec.
    :param conn_id: the Airflow connection id.
    :param operation: the hook operation.
    :param status: the HTTP status.
    :param request_id: the request id from the headers, if any.
    """
    return MalformedResponseError(
        what,
        vendor=vendor.name,
        conn_id=conn_id,
        operation=operation,
        status_code=status,
        request_id=request_id,
    )
