from __future__ import annotations

import json
import pickle
from typing import Any

import aiohttp
import httpx
import pydantic
import pytest
import yarl
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy

from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FileTooLargeError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks.errors import (
    KIND_EXCEPTIONS,
    STATUS_KINDS,
    error_from_response,
    parse_error_body,
    summarize_validation,
    transport_error,
)
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.retry import classify
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

KEY = "sk-test-0123456789abcdefSECRET"


def _vendor_body(vendor: VendorSpec, code: str | None, message: str = "it went wrong") -> bytes:
    """Shape an error body the way the vendor's dialect does."""
    error: dict[str, Any] = {"message": message}
    if code is not None:
        error["type" if "code" not in dialect_of(vendor).errors.fields else "code"] = code
    body: dict[str, Any] = {"error": error}
    if dialect_of(vendor).errors.request_id_in_body:
        body["request_id"] = "rid-in-body"
    return json.dumps(body).encode()


def _error(
    vendor: VendorSpec,
    status: int,
    content: bytes,
    *,
    headers: dict[str, str] | None = None,
    operation: str = "get_batch",
) -> VendorAPIError:
    return error_from_response(
        vendor,
        status=status,
        reason=httpx.codes.get_reason_phrase(status) or "Unknown",
        headers=httpx.Headers(headers or {}),
        content=content,
        conn_id="my_conn",
        operation=operation,
        secret=KEY,
    )


# (vendor, status, code/type, operation, expected class)
TABLE: list[tuple[str, int, str | None, str, type[VendorAPIError]]] = [
    ("zhipu", 400, "1214", "create_batch", BadRequestError),
    ("zhipu", 400, "1210", "create_batch", ConflictError),
    ("zhipu", 400, "1301", "create_batch", BadRequestError),
    ("zhipu", 401, "1000", "get_batch", AuthenticationError),
    ("zhipu", 401, "1003", "get_batch", AuthenticationError),
    ("zhipu", 404, "404", "get_batch", NotFoundError),  # no documented code: the status decides
    ("zhipu", 404, None, "get_batch", NotFoundError),
    ("zhipu", 429, "1302", "get_batch", RateLimitError),
    ("zhipu", 429, "1113", "get_batch", QuotaExceededError),
    ("zhipu", 429, None, "get_batch", RateLimitError),
    ("zhipu", 434, "1220", "get_batch", PermissionDeniedError),
    ("zhipu", 434, None, "get_batch", PermissionDeniedError),
    ("zhipu", 435, "1215", "upload_file", FileTooLargeError),
    ("zhipu", 435, None, "upload_file", FileTooLargeError),
    ("zhipu", 500, "500", "get_batch", ServerError),
    ("moonshot", 400, "invalid_request_error", "create_batch", BadRequestError),
    ("moonshot", 400, "invalid_request_error", "cancel_batch", ConflictError),
    ("moonshot", 401, "invalid_authentication_error", "get_batch", AuthenticationError),
    ("moonshot", 404, "resource_not_found_error", "get_batch", NotFoundError),
    ("moonshot", 404, "resource_not_found_error", "cancel_batch", NotFoundError),
    ("moonshot", 429, "rate_limit_reached_error", "get_batch", RateLimitError),
    ("moonshot", 429, "engine_overloaded_error", "get_batch", RateLimitError),
    ("moonshot", 429, "exceeded_current_quota_error", "create_batch", QuotaExceededError),
    ("moonshot", 500, "server_error", "get_batch", ServerError),
    ("dashscope", 400, "InvalidParameter", "create_batch", BadRequestError),
    ("dashscope", 400, "InvalidParameter", "cancel_batch", ConflictError),
    ("dashscope", 401, "invalid_api_key", "get_batch", AuthenticationError),
    ("dashscope", 403, "AccessDenied", "get_batch", PermissionDeniedError),
    ("dashscope", 404, "NotFound", "get_batch", NotFoundError),
    ("dashscope", 429, "Throttling.RateQuota", "list_batches", RateLimitError),
    ("dashscope", 400, "Arrearage", "create_batch", QuotaExceededError),
    ("dashscope", 500, "InternalError", "get_batch", ServerError),
    ("openai", 400, "invalid_request_error", "create_batch", BadRequestError),
    ("openai", 401, "invalid_api_key", "get_batch", AuthenticationError),
    ("openai", 403, "permission_denied", "get_batch", PermissionDeniedError),
    ("openai", 404, "not_found", "get_batch", NotFoundError),
    ("openai", 409, "conflict", "cancel_batch", ConflictError),
    ("openai", 413, "file_too_large", "upload_file", FileTooLargeError),
    ("openai", 422, None, "create_batch", BadRequestError),
    ("openai", 429, "rate_limit_exceeded", "get_batch", RateLimitError),
    ("openai", 429, "insufficient_quota", "create_batch", QuotaExceededError),
    ("openai", 502, None, "get_batch", ServerError),
    ("openai", 503, None, "get_batch", ServerError),
    ("openai", 418, None, "get_batch", BadRequestError),
]


@pytest.mark.parametrize(
    ("vendor", "status", "code", "operation", "expected"),
    TABLE,
    ids=[f"{v}-{s}-{c}-{o}" for v, s, c, o, _ in TABLE],
)
def test_status_and_vendor_code_to_exception(
    vendor: str, status: int, code: str | None, operation: str, expected: type[VendorAPIError]
) -> None:
    spec = REGISTRY[vendor]
    exc = _error(spec, status, _vendor_body(spec, code), operation=operation)
    assert type(exc) is expected
    assert exc.status_code == status
    assert exc.vendor == vendor
    assert exc.conn_id == "my_conn"
    assert exc.operation == operation
    assert exc.code == code
    assert "it went wrong" in str(exc)


@pytest.mark.parametrize("vendor", list(REGISTRY.values()), ids=list(REGISTRY))
@pytest.mark.parametrize("kind", sorted(KIND_EXCEPTIONS))
def test_every_registry_code_maps_to_its_kind_or_its_status(vendor: VendorSpec, kind: str) -> None:
    status, code = vendor.errors.codes[kind]  # type: ignore[index]
    exc = _error(vendor, status, _vendor_body(vendor, code), operation="create_batch")
    same_pair = {k for k, (s, c) in vendor.errors.codes.items() if (s, c) == (status, code)}
    if code in vendor.errors.code_kinds or len(same_pair) == 1:
        assert type(exc) is KIND_EXCEPTIONS[kind]  # type: ignore[index]
    else:
        # The vendor uses one code for several kinds: the HTTP status decides.
        assert type(exc) is KIND_EXCEPTIONS[STATUS_KINDS[status]]


def test_a_quota_429_is_never_a_rate_limit() -> None:
    for spec in REGISTRY.values():
        status, code = spec.errors.codes["quota_exceeded"]
        exc = _error(spec, status, _vendor_body(spec, code))
        assert isinstance(exc, QuotaExceededError)
        assert not isinstance(exc, RateLimitError)


def test_redirect_or_unknown_status_is_the_base_class() -> None:
    exc = _error(REGISTRY["openai"], 302, b"")
    assert type(exc) is VendorAPIError


@pytest.mark.parametrize(
    ("content", "code", "message", "request_id"),
    [
        (b'{"error":{"code":"1302","message":"busy"}}', "1302", "busy", None),
        (b'{"error":{"type":"invalid_request_error","message":"bad"}}', "invalid_request_error", "bad", None),
        (
            b'{"error":{"message":"m","type":"t","param":"p","code":"c"},"request_id":"r1"}',
            "c",
            "m [param: p]",
            "r1",
        ),
        (b'{"code":"InvalidParameter","message":"flat","request_id":"r2"}', "InvalidParameter", "flat", "r2"),
        (b'{"code":1113,"msg":"numeric code"}', "1113", "numeric code", None),
        (b'{"error":"just a string"}', None, "just a string", None),
        (b'{"error":null,"message":null}', None, "Bad Request", None),
        (b"[1, 2]", None, "Bad Request", None),
        (b"", None, "Bad Request", None),
        (b"   ", None, "Bad Request", None),
        (
            b"<html><body><h1>400 Bad Request</h1></body></html>",
            None,
            "Bad Request: <html><body><h1>400",
            None,
        ),
        (b"\xff\xfe not utf8", None, "Bad Request:", None),
    ],
)
def test_error_bodies_are_read_leniently(
    content: bytes, code: str | None, message: str, request_id: str | None
) -> None:
    exc = _error(REGISTRY["openai"], 400, content)
    assert isinstance(exc, BadRequestError)
    assert exc.code == code
    assert message in exc.vendor_message
    assert exc.request_id == request_id


def test_html_snippet_is_capped() -> None:
    page = b"<html>" + b"x" * 5000 + b"</html>"
    body = parse_error_body(page, reason="Bad Gateway", secret=KEY)
    assert body.message is not None
    assert body.message.startswith("Bad Gateway: <html>")
    assert len(body.message) <= len("Bad Gateway: ") + 200


@pytest.mark.parametrize("offset", [0, 150, 190, 195, 199, 250])
def test_key_echoed_in_an_html_page_never_leaks(offset: int) -> None:
    page = b"<html>" + b"y" * offset + KEY.encode() + b"</html>"
    exc = _error(REGISTRY["zhipu"], 502, page)
    for text in (str(exc), repr(exc), exc.vendor_message):
        assert KEY not in text
        # Not even the first half of a key cut at the snippet boundary.
        assert KEY[:12] not in text


def test_key_echoed_in_a_json_message_or_code_is_redacted() -> None:
    content = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}", "code": KEY}}).encode()
    exc = _error(REGISTRY["openai"], 401, content)
    assert isinstance(exc, AuthenticationError)
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert "***" in exc.vendor_message


@pytest.mark.parametrize(
    ("vendor", "headers", "body_rid", "expected"),
    [
        ("zhipu", {"x-log-id": "log-1"}, None, "log-1"),
        ("zhipu", {"x-request-id": "req-1", "x-log-id": "log-1"}, None, "req-1"),
        ("moonshot", {"msh-request-id": "msh-1"}, None, "msh-1"),
        ("dashscope", {"x-dashscope-request-id": "ds-1"}, "body-1", "body-1"),
        ("dashscope", {"x-dashscope-request-id": "ds-1"}, None, "ds-1"),
        ("openai", {"x-request-id": "oa-1"}, None, "oa-1"),
        ("openai", {"x-unknown-id": "nope"}, None, None),
    ],
)
def test_request_id_from_body_or_vendor_headers(
    vendor: str, headers: dict[str, str], body_rid: str | None, expected: str | None
) -> None:
    body: dict[str, Any] = {"error": {"message": "x"}}
    if body_rid:
        body["request_id"] = body_rid
    exc = _error(REGISTRY[vendor], 500, json.dumps(body).encode(), headers=headers)
    assert exc.request_id == expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {"Retry-After": "12"}, 12.0),
        (429, {}, None),
        (503, {"Retry-After": "3"}, 3.0),
        (500, {"Retry-After": "3"}, None),
    ],
)
def test_retry_after_is_carried(status: int, headers: dict[str, str], expected: float | None) -> None:
    exc = _error(REGISTRY["openai"], status, b"{}", headers=headers)
    assert exc.retry_after == expected


def _request_info() -> aiohttp.RequestInfo:
    url = yarl.URL("http://vendor.test/v1/batches/b1")
    return aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)


def _connector_error(cls: type[aiohttp.ClientConnectorError], os_error: OSError) -> BaseException:
    key = ConnectionKey("vendor.test", 443, True, True, None, None, None, "vendor.test")
    return cls(key, os_error)  # type: ignore[arg-type]


# What each face's library raises -> (class, effect): the effect decides whether a create may be repeated.
TRANSPORT: list[tuple[str, BaseException, type[APIConnectionError], str | None]] = [
    ("httpx connect", httpx.ConnectError("refused"), APIConnectionError, "not_sent"),
    ("httpx connect timeout", httpx.ConnectTimeout("slow"), APITimeoutError, "not_sent"),
    ("httpx pool timeout", httpx.PoolTimeout("busy"), APITimeoutError, "not_sent"),
    ("httpx proxy", httpx.ProxyError("407"), APIConnectionError, "not_sent"),
    ("httpx read timeout", httpx.ReadTimeout("slow"), APITimeoutError, "unknown"),
    ("httpx write timeout", httpx.WriteTimeout("slow"), APITimeoutError, "unknown"),
    ("httpx read", httpx.ReadError("reset"), APIConnectionError, "unknown"),
    ("httpx write", httpx.WriteError("reset"), APIConnectionError, "unknown"),
    ("httpx peer closed", httpx.RemoteProtocolError("peer closed"), APIConnectionError, "unknown"),
    ("httpx unsupported protocol", httpx.UnsupportedProtocol("ftp"), APIConnectionError, None),
    ("httpx local protocol", httpx.LocalProtocolError("bad header"), APIConnectionError, None),
    ("httpx decoding", httpx.DecodingError("bad gzip"), APIConnectionError, None),
    (
        "aiohttp connect",
        _connector_error(aiohttp.ClientConnectorError, OSError(111, "refused")),
        APIConnectionError,
        "not_sent",
    ),
    (
        "aiohttp dns",
        _connector_error(aiohttp.ClientConnectorDNSError, OSError(-2, "unknown")),
        APIConnectionError,
        "not_sent",
    ),
    (
        "aiohttp proxy connect",
        _connector_error(aiohttp.ClientProxyConnectionError, OSError(111, "x")),
        APIConnectionError,
        "not_sent",
    ),
    ("aiohttp connect timeout", aiohttp.ConnectionTimeoutError("slow"), APITimeoutError, "not_sent"),
    ("aiohttp read timeout", aiohttp.SocketTimeoutError("slow"), APITimeoutError, "unknown"),
    ("asyncio timeout (total)", TimeoutError(), APITimeoutError, "unknown"),
    ("aiohttp disconnected", aiohttp.ServerDisconnectedError(), APIConnectionError, "unknown"),
    ("aiohttp short body", aiohttp.ClientPayloadError("not complete"), APIConnectionError, "unknown"),
    (
        "aiohttp reset while writing",
        aiohttp.ClientConnectionResetError("Connection lost"),
        APIConnectionError,
        "unknown",
    ),
    ("aiohttp os error", aiohttp.ClientOSError(104, "reset"), APIConnectionError, "unknown"),
    ("aiohttp bad answer", aiohttp.ClientResponseError(_request_info(), ()), APIConnectionError, "unknown"),
    ("aiohttp invalid url", aiohttp.InvalidURL("http://"), APIConnectionError, None),
    ("anything else", RuntimeError("?"), APIConnectionError, None),
]


@pytest.mark.parametrize(
    ("error", "cls", "effect"), [t[1:] for t in TRANSPORT], ids=[t[0] for t in TRANSPORT]
)
def test_transport_errors_of_both_faces(
    error: BaseException, cls: type[APIConnectionError], effect: str | None
) -> None:
    exc = transport_error(error, vendor=REGISTRY["moonshot"], conn_id="c", operation="get_batch", secret=KEY)
    assert type(exc) is cls
    assert (exc.effect, classify(exc)) == (effect, effect)
    assert exc.status_code is None
    assert str(exc).startswith(f"{cls.__name__}: {type(error).__name__}: ")
    assert "vendor=moonshot" in str(exc)
    assert "conn_id=c" in str(exc)
    revived = pickle.loads(pickle.dumps(exc))
    assert (type(revived), revived.effect, str(revived)) == (cls, effect, str(exc))


def test_transport_error_text_never_holds_the_key() -> None:
    error = httpx.ConnectError(f"refused for Bearer {KEY} and {KEY!r}")
    exc = transport_error(error, vendor=REGISTRY["openai"], conn_id="c", operation="get_batch", secret=KEY)
    assert KEY not in str(exc)
    assert "***" in str(exc)


def test_reason_phrase_echoing_the_key_is_redacted() -> None:
    exc = error_from_response(
        REGISTRY["openai"],
        status=401,
        reason=f"Bad key {KEY}",
        headers=httpx.Headers({"x-request-id": f"rid-{KEY}"}),
        content=b"not json",
        conn_id="c",
        operation="get_batch",
        secret=KEY,
    )
    assert isinstance(exc, AuthenticationError)
    assert KEY not in str(exc)
    assert KEY not in repr(exc)


def test_validation_summary_never_contains_the_input() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Batch.model_validate({"id": "", "status": None, "secret": KEY, "metadata": {"k": KEY}})
    summary = summarize_validation(info.value)
    assert "id" in summary
    assert "status" in summary
    assert KEY not in summary
