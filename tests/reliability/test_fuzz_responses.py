"""
Hostile responses: any body a vendor (or a proxy) sends becomes a model or a typed error, never a crash.

Parsing is exercised through the hook core (:class:`~airflow_provider_llmbatch.hooks._core.Core`), the
code both hook faces call, so what is checked is what a DAG would see.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch.exceptions import MalformedResponseError, VendorAPIError
from airflow_provider_llmbatch.hooks._core import ConnSettings, Core, Reply, Request
from airflow_provider_llmbatch.hooks.errors import error_from_response, parse_error_body
from airflow_provider_llmbatch.models import (
    Batch,
    BatchError,
    FileObject,
    Page,
    RequestCounts,
)
from airflow_provider_llmbatch.result_lines import ResultLine
from airflow_provider_llmbatch.vendors import REGISTRY

EXAMPLES = int(os.environ.get("LLMBATCH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize=True, database=None)

SECRET = "sk-canary-fuzz-6b1f0c2e9d8a4f7b"
VENDORS = sorted(REGISTRY)

# Every JSON type, with the numbers real parsers choke on: huge integers, NaN and the infinities
# (Python's json reads and writes those tokens, and some vendor stacks emit them).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", " ", "0", "-1", "1e400", "NaN", "2024-01-01T00:00:00Z", "completed", "null"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

BATCH_FIELDS = sorted(Batch.model_fields)
FILE_FIELDS = sorted(FileObject.model_fields)


def _objects(fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts holding any subset of ``fields`` (plus unknown keys), each with any JSON value."""
    return st.dictionaries(
        st.sampled_from(fields) | st.text(max_size=12), json_values, max_size=len(fields) + 2
    )


def _core(vendor: str) -> Core:
    spec = REGISTRY[vendor]
    return Core(ConnSettings(conn_id="fuzz", vendor=spec, base_url="http://vendor.test", api_key=SECRET))


REQUEST = Request("get_batch", "GET", "/batches/b")
HEADERS = httpx.Headers({"x-request-id": "req-1"})


def _identity_ok(data: Any, *, needs_status: bool) -> bool:
    """Return whether the object carries what the models require: an id (and a batch's status)."""
    if not isinstance(data, dict):
        return False
    ident = data.get("id")
    good_id = (isinstance(ident, str) and ident != "") or (
        isinstance(ident, int | float) and not isinstance(ident, bool)
    )
    return good_id and (not needs_status or isinstance(data.get("status"), str))


def _encode(data: Any) -> bytes:
    return json.dumps(data, allow_nan=True).encode()


def _exercise_batch(batch: Batch) -> None:
    """Touch everything callers read; none of it may raise."""
    summary = batch.summary()
    json.dumps(summary, allow_nan=False)
    _ = (batch.state, batch.is_terminal, batch.request_counts.done, batch.raw)
    for count in (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed):
        assert count is None or isinstance(count, int)


@FUZZ
@given(data=_objects(BATCH_FIELDS), vendor=st.sampled_from(VENDORS))
def test_any_batch_body_is_a_batch_or_malformed(data: dict[str, Any], vendor: str) -> None:
    core = _core(vendor)
    outcome: Batch | MalformedResponseError
    try:
        outcome = core.parse(REQUEST, Reply(200, HEADERS, _encode(data)), Batch)
    except MalformedResponseError as exc:
        outcome = exc
    if isinstance(outcome, MalformedResponseError):
        assert not _identity_ok(data, needs_status=True), (
            f"rejected a batch with an id and a status: {outcome}"
        )
        assert outcome.vendor == vendor
        assert SECRET not in str(outcome)
        return
    assert _identity_ok(data, needs_status=True)
    _exercise_batch(outcome)


@FUZZ
@given(data=_objects(FILE_FIELDS), vendor=st.sampled_from(VENDORS))
def test_any_file_body_is_a_file_or_malformed(data: dict[str, Any], vendor: str) -> None:
    try:
        item = _core(vendor).parse(REQUEST, Reply(200, HEADERS, _encode(data)), FileObject)
    except MalformedResponseError:
        assert not _identity_ok(data, needs_status=False)
        return
    assert _identity_ok(data, needs_status=False)
    assert item.bytes is None or isinstance(item.bytes, int)
    assert item.created_at is None or item.created_at.tzinfo is not None


@FUZZ
@given(
    page=st.dictionaries(
        st.sampled_from(["data", "first_id", "last_id", "has_more", "object"]) | st.text(max_size=8),
        json_values,
    ),
    items=st.lists(_objects(BATCH_FIELDS) | json_values, max_size=5),
    with_items=st.booleans(),
    model=st.sampled_from([Batch, FileObject]),
    vendor=st.sampled_from(VENDORS),
)
def test_any_page_body_is_a_page_of_valid_items(
    page: dict[str, Any], items: list[Any], with_items: bool, model: type[Any], vendor: str
) -> None:
    if with_items:
        page = {**page, "data": items}
    parsed = _core(vendor).parse_page(REQUEST, Reply(200, HEADERS, _encode(page)), model)
    raw_items = page.get("data") if isinstance(page.get("data"), list) else []
    expected = [i for i in raw_items if _identity_ok(i, needs_status=model is Batch)]
    assert len(parsed.data) == len(expected)
    assert parsed.has_more in (None, True, False)


@FUZZ
@given(content=st.binary(max_size=512) | json_values.map(_encode), vendor=st.sampled_from(VENDORS))
def test_any_bytes_are_a_model_or_malformed(content: bytes, vendor: str) -> None:
    core = _core(vendor)
    for parse in (
        lambda: core.parse(REQUEST, Reply(200, HEADERS, content), Batch),
        lambda: core.parse(REQUEST, Reply(200, HEADERS, content), FileObject),
        lambda: core.parse_page(REQUEST, Reply(200, HEADERS, content), Batch),
    ):
        request_id: str | None = "req-1"
        try:
            parse()
        except MalformedResponseError as exc:
            request_id = exc.request_id
        assert request_id == "req-1"


@FUZZ
@given(
    counts=_objects(["total", "completed", "failed"]),
    error=_objects(["code", "message", "param", "line"]),
    line=_objects(["id", "custom_id", "response", "error"]),
    response=_objects(["status_code", "request_id", "body"]),
    body=_objects(["usage", "error", "choices"]),
)
def test_lenient_models_never_reject(
    counts: dict[str, Any],
    error: dict[str, Any],
    line: dict[str, Any],
    response: dict[str, Any],
    body: dict[str, Any],
) -> None:
    parsed_counts = RequestCounts.model_validate(counts)
    assert isinstance(parsed_counts.done, int)
    assert isinstance(BatchError.model_validate(error).describe(), str)
    for candidate in (line, {**line, "response": {**response, "body": body}}):
        result = ResultLine.model_validate(candidate)
        _ = (result.succeeded, result.error_code, result.error_message)
        assert all(isinstance(v, int) for v in result.usage.values())


def test_nested_page_models_parse_standalone() -> None:
    page = Page[Batch].model_validate({"data": [{"id": "b", "status": "completed"}, 3], "has_more": "yes"})
    assert [b.id for b in page.data] == ["b"]
    assert page.has_more is None


def test_huge_and_non_finite_numbers_read_as_unset() -> None:
    text = (
        b'{"id":"b","status":"completed","created_at":1' + b"0" * 400 + b","
        b'"completed_at":NaN,"expires_at":Infinity,"request_counts":{"total":-Infinity,"completed":1e400}}'
    )
    batch = _core("openai").parse(REQUEST, Reply(200, HEADERS, text), Batch)
    assert (batch.created_at, batch.completed_at, batch.expires_at) == (None, None, None)
    assert (batch.request_counts.total, batch.request_counts.completed) == (None, None)


def test_deep_success_body_is_malformed_not_a_crash() -> None:
    depth = 100_000
    content = b'{"id":"b","status":"completed","x":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(MalformedResponseError, match="not JSON"):
        _core("zhipu").parse(REQUEST, Reply(200, HEADERS, content), Batch)


# -- error bodies -------------------------------------------------------------------------------------

ERROR_FIELDS = ["error", "code", "message", "msg", "type", "param", "request_id"]


def _salted(value: Any, salt: bool) -> Any:
    """Put the key into a text value (as a vendor echoing the Authorization header would)."""
    if salt and isinstance(value, str):
        return f"{value} Bearer {SECRET} {value}"
    return value


@st.composite
def error_bodies(draw: st.DrawFn) -> bytes:
    salt = draw(st.booleans())
    shape = draw(st.sampled_from(["nested", "flat", "string", "text", "bytes"]))
    if shape == "bytes":
        return draw(st.binary(max_size=300)) + (SECRET.encode() if salt else b"")
    if shape == "text":
        page = f"<html><body>401 {draw(st.text(max_size=50))} Authorization: Bearer {SECRET}</body></html>"
        return page.encode()
    fields = draw(
        st.dictionaries(
            st.sampled_from(ERROR_FIELDS),
            json_values | st.text(min_size=1, max_size=20),
            max_size=len(ERROR_FIELDS),
        )
    )
    fields = {k: _salted(v, salt) for k, v in fields.items()}
    if shape == "nested":
        return _encode({"error": fields, "request_id": _salted(draw(st.text(max_size=10)), salt)})
    if shape == "string":
        return _encode({"error": _salted(draw(st.text(max_size=30)), salt)})
    return _encode(fields)


@FUZZ
@given(
    content=error_bodies() | st.binary(max_size=256),
    status=st.integers(min_value=400, max_value=599),
    vendor=st.sampled_from(VENDORS),
    reason=st.sampled_from(["Unauthorized", "", f"Bad key {SECRET}"]),
    header_id=st.sampled_from(["", "req-9", f"echo-{SECRET}"]),
    operation=st.sampled_from(["get_batch", "cancel_batch", "create_batch", "upload_file"]),
)
def test_any_error_body_is_a_typed_error_without_the_key(
    content: bytes, status: int, vendor: str, reason: str, header_id: str, operation: str
) -> None:
    headers = httpx.Headers({REGISTRY[vendor].errors.request_id_headers[0]: header_id} if header_id else {})
    exc = error_from_response(
        REGISTRY[vendor],
        status=status,
        reason=reason,
        headers=headers,
        content=content,
        conn_id="fuzz",
        operation=operation,
        secret=SECRET,
    )
    assert isinstance(exc, VendorAPIError)
    assert exc.status_code == status
    for text in (str(exc), repr(exc), exc.vendor_message, exc.code or "", exc.request_id or ""):
        assert SECRET not in text
    if exc.retry_after is not None:
        assert math.isfinite(exc.retry_after)


@FUZZ
@given(content=st.binary(max_size=1024))
def test_error_body_reader_takes_any_bytes(content: bytes) -> None:
    body = parse_error_body(content + SECRET.encode(), reason="Bad Gateway", secret=SECRET)
    assert all(SECRET not in (v or "") for v in vars(body).values())


def test_deep_error_body_is_read_as_text() -> None:
    depth = 100_000
    body = parse_error_body(b"[" * depth + b"]" * depth, reason="Bad Gateway", secret=SECRET)
    assert body.message is not None
    assert body.message.startswith("Bad Gateway: [[[")
