from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch import jsonl_check
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.jsonl import (
    RequestFileCheck,
    RequestFileReport,
    build_request_file,
    fingerprint,
    iter_request_lines,
    split_request_file,
    validate_request_file,
)
from airflow_provider_llmbatch.vendors import REGISTRY, EndpointSpec, VendorSpec

VENDORS = list(REGISTRY.values())
ENDPOINTS = [(spec, ep) for spec in VENDORS for ep in spec.endpoints]
ENDPOINT_IDS = [f"{spec.name}{ep.path}" for spec, ep in ENDPOINTS]


# ---------------------------------------------------------------------------------------------- helpers


def model_for(endpoint: EndpointSpec) -> str:
    return endpoint.required_model or "model-a"


def body_for(endpoint: EndpointSpec, model: str | None = None, **extra: Any) -> dict[str, Any]:
    model = model or model_for(endpoint)
    if endpoint.kind in ("chat", "test"):
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "你好, hello"}]}
    elif endpoint.kind in ("embeddings", "responses"):
        body = {"model": model, "input": "some text"}
    else:
        body = {"model": model, "prompt": "a prompt"}
    return {**body, **extra}


def request(endpoint: EndpointSpec, n: int, **overrides: Any) -> dict[str, Any]:
    line = {"custom_id": f"req-{n}", "method": "POST", "url": endpoint.path, "body": body_for(endpoint)}
    line.update(overrides)
    return line


def dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def good_lines(endpoint: EndpointSpec, count: int) -> list[bytes]:
    return [dump(request(endpoint, n)) for n in range(1, count + 1)]


def write(tmp_path: Path, lines: list[bytes], name: str = "requests.jsonl", *, end: bytes = b"\n") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + (end if lines else b""))
    return path


def with_limits(spec: VendorSpec, **limits: Any) -> VendorSpec:
    return dataclasses.replace(spec, limits=dataclasses.replace(spec.limits, **limits))


def problems_of(excinfo: pytest.ExceptionInfo[InvalidRequestFileError]) -> str:
    return "\n".join(excinfo.value.problems)


@pytest.fixture(params=["1MiB", "7B"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Read in the normal chunk size, and in tiny chunks so lines span reads and hashing is threaded."""
    if request.param == "7B":
        monkeypatch.setattr(jsonl_check, "_CHUNK", 7)
    return int(jsonl_check._CHUNK)


# ------------------------------------------------------------------------------------ broken files table
# Each case builds a file for (spec, endpoint) and names the fragments the problem list must contain:
# the exact "line N: field:" (or "file: field:") and what makes the message useful.

Case = Callable[[VendorSpec, EndpointSpec], tuple[VendorSpec, list[bytes], list[str]]]


def _bad_json(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 3)
    lines[1] = lines[1][:-5]
    return spec, lines, ["line 2: json: expected a JSON object, got malformed JSON"]


def _not_object(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return (
        spec,
        [*good_lines(ep, 2), b'["custom_id", "x"]'],
        ["line 3: json: expected a JSON object, got array"],
    )


def _duplicate(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 4)
    lines[3] = dump(request(ep, 2))
    return spec, lines, ["line 4: custom_id:", "on line 2 already", '"req-2"']


def _missing_id(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    line = request(ep, 2)
    del line["custom_id"]
    return (
        spec,
        [good_lines(ep, 1)[0], dump(line)],
        ["line 2: custom_id: expected a non-empty string, got nothing"],
    )


def _empty_id(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return spec, [*good_lines(ep, 1), dump(request(ep, 2, custom_id=""))], ["line 2: custom_id:", 'string ""']


def _numeric_id(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return (
        spec,
        [dump(request(ep, 1, custom_id=7))],
        ["line 1: custom_id: expected a non-empty string, got number 7"],
    )


def _mixed_models(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 4)
    lines[2] = dump(request(ep, 3, body=body_for(ep, "model-b")))
    lines[3] = dump(request(ep, 4, body=body_for(ep, "model-c")))
    first = model_for(ep)
    return spec, lines, [f"line 3: body.model: expected {first!r} like line 1", "model-b"]


def _no_model(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    body = body_for(ep)
    del body["model"]
    return (
        spec,
        [*good_lines(ep, 1), dump(request(ep, 2, body=body))],
        ["line 2: body.model: expected a non-empty"],
    )


def _wrong_url(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = [*good_lines(ep, 1), dump(request(ep, 2, url="/v9/nowhere"))]
    return spec, lines, [f"line 2: url: expected {ep.path!r}", '"/v9/nowhere"']


def _wrong_method(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return spec, [dump(request(ep, 1, method="GET"))], ["line 1: method: expected 'POST', got string \"GET\""]


def _body_not_object(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return spec, [dump(request(ep, 1, body="hello"))], ["line 1: body: expected an object, got string"]


def _unknown_key(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return (
        spec,
        [dump(request(ep, 1, extra=1))],
        ["line 1: extra: expected only custom_id, method, url and body"],
    )


def _nan(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    line = dump(request(ep, 2)).replace(b'"body": {', b'"body": {"max_tokens": NaN, ')
    return spec, [*good_lines(ep, 1), line], ["line 2: json: expected strict JSON, got NaN"]


def _infinity(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    line = dump(request(ep, 1)).replace(b'"body": {', b'"body": {"max_tokens": -Infinity, ')
    return spec, [line], ["line 1: json: expected strict JSON, got -Infinity"]


def _not_utf8(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 3)
    lines[2] = dump(request(ep, 3, custom_id="caf\x00")).replace(b"\\u0000", b"\xe9")
    return spec, lines, ["line 3: encoding: expected UTF-8 text, got byte 0xe9"]


def _not_utf8_in_prompt(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    # Invalid bytes inside the prompt text: the part of a line the checks otherwise never look at.
    line = dump(request(ep, 2, body=body_for(ep, messages="caf\x00", input="caf\x00", prompt="caf\x00")))
    return (
        spec,
        [*good_lines(ep, 1), line.replace(b"\\u0000", b"\xff")],
        ["line 2: encoding: expected UTF-8 text"],
    )


def _bom(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 2)
    lines[0] = b"\xef\xbb\xbf" + lines[0]
    return spec, lines, ["line 1: encoding: expected UTF-8 without a byte order mark", "BOM"]


def _blank_middle(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    lines = good_lines(ep, 3)
    return (
        spec,
        [lines[0], b"", lines[1], b" \t", lines[2]],
        [
            "line 2: line: expected a JSON request (no blank lines), got a blank line",
            "line 4: line:",
        ],
    )


def _trailing_blank(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return spec, [*good_lines(ep, 2), b""], ["line 3: line: expected a JSON request"]


def _empty(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return spec, [], ["file: lines: expected at least one request, got an empty file"]


def _only_newlines(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    return (
        spec,
        [b"", b""],
        ["file: lines: expected at least one request, got only blank lines", "line 1: line:"],
    )


def _over_requests(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    small = with_limits(spec, max_requests=3)
    return (
        small,
        good_lines(ep, 4),
        [f"file: requests: expected at most 3 requests per file for {ep.path}", "got 4"],
    )


def _over_bytes(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    small = with_limits(spec, max_file_bytes=300)
    lines = good_lines(ep, 4)
    size = sum(len(line) + 1 for line in lines)
    return small, lines, ["file: bytes: expected at most 300 bytes", f"got {size} bytes"]


def _over_line_size(spec: VendorSpec, ep: EndpointSpec) -> tuple[VendorSpec, list[bytes], list[str]]:
    small = with_limits(spec, max_line_bytes=150)
    lines = [*good_lines(ep, 1), dump(request(ep, 2, body=body_for(ep, input="x" * 200, prompt="x" * 200)))]
    return small, lines, ["line 2: line: expected at most 150 bytes", f"got {len(lines[1])} bytes"]


CASES: dict[str, Case] = {
    "bad-json": _bad_json,
    "not-an-object": _not_object,
    "duplicate-custom-id": _duplicate,
    "missing-custom-id": _missing_id,
    "empty-custom-id": _empty_id,
    "numeric-custom-id": _numeric_id,
    "mixed-models": _mixed_models,
    "missing-model": _no_model,
    "wrong-url": _wrong_url,
    "wrong-method": _wrong_method,
    "body-not-object": _body_not_object,
    "unknown-key": _unknown_key,
    "nan": _nan,
    "infinity": _infinity,
    "not-utf8": _not_utf8,
    "not-utf8-in-prompt": _not_utf8_in_prompt,
    "bom": _bom,
    "blank-line-in-middle": _blank_middle,
    "blank-line-at-end": _trailing_blank,
    "empty-file": _empty,
    "only-newlines": _only_newlines,
    "over-request-limit": _over_requests,
    "over-byte-limit": _over_bytes,
    "over-line-limit": _over_line_size,
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_broken_file_names_line_and_field(tmp_path: Path, spec: VendorSpec, case: str) -> None:
    endpoint = spec.endpoints[0]
    checked_spec, lines, expected = CASES[case](spec, endpoint)
    path = write(tmp_path, lines)
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, checked_spec)
    listed = problems_of(excinfo)
    for fragment in expected:
        assert fragment in listed
    assert excinfo.value.source == str(path)
    assert str(path) in str(excinfo.value)


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_forbidden_body_keys_follow_the_spec(tmp_path: Path, spec: VendorSpec) -> None:
    endpoint = spec.endpoints[0]
    body = body_for(endpoint, temperature=0.2, top_p=0.9)
    path = write(tmp_path, [*good_lines(endpoint, 1), dump(request(endpoint, 2, body=body))])
    forbidden = sorted(spec.forbidden_body_keys & {"temperature", "top_p"})
    if not forbidden:
        assert validate_request_file(path, spec).lines == 2
        return
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec)
    for key in forbidden:
        assert f"line 2: body.{key}: expected no {key!r}" in problems_of(excinfo)
    assert spec.display_name in problems_of(excinfo)


def test_wrong_extension(tmp_path: Path) -> None:
    spec = REGISTRY["zhipu"]
    path = write(tmp_path, good_lines(spec.endpoints[0], 1), name="requests.json")
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec)
    assert excinfo.value.problems == [
        "file: name: expected a file name ending in '.jsonl', got 'requests.json'"
    ]


def test_anonymous_stream_skips_the_name_check() -> None:
    spec = REGISTRY["openai"]
    data = b"\n".join(good_lines(spec.endpoints[0], 2))
    report = validate_request_file(io.BytesIO(data), spec)
    assert (report.lines, report.source) == (2, "<stream>")


def test_text_mode_stream_is_refused(tmp_path: Path) -> None:
    spec = REGISTRY["openai"]
    path = write(tmp_path, good_lines(spec.endpoints[0], 1))
    with path.open() as handle, pytest.raises(InvalidInputError, match="binary mode"):
        validate_request_file(handle, spec)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_unknown_endpoint_lists_the_allowed_ones(tmp_path: Path, spec: VendorSpec) -> None:
    path = write(tmp_path, good_lines(spec.endpoints[0], 1))
    with pytest.raises(InvalidInputError) as excinfo:
        validate_request_file(path, spec, "/v1/nope")
    assert not isinstance(excinfo.value, InvalidRequestFileError)
    for endpoint in spec.endpoints:
        assert endpoint.path in str(excinfo.value)


@pytest.mark.parametrize(("spec", "endpoint"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_required_model_of_an_endpoint(tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec) -> None:
    path = write(tmp_path, [dump(request(endpoint, 1, body=body_for(endpoint, "some-model")))])
    if endpoint.required_model is None:
        assert validate_request_file(path, spec, endpoint.path).model == "some-model"
        return
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec, endpoint.path)
    assert f"line 1: body.model: expected {endpoint.required_model!r}" in problems_of(excinfo)


@pytest.mark.parametrize(
    ("spec", "endpoint"),
    [(s, e) for s, e in ENDPOINTS if e.max_requests is not None],
    ids=[i for (s, e), i in zip(ENDPOINTS, ENDPOINT_IDS, strict=True) if e.max_requests is not None],
)
def test_endpoint_request_limit_is_tighter(tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec) -> None:
    assert endpoint.max_requests is not None
    limit = endpoint.max_requests
    path = write(tmp_path, good_lines(endpoint, limit))
    assert validate_request_file(path, spec, endpoint.path).lines == limit
    path = write(tmp_path, good_lines(endpoint, limit + 1))
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec, endpoint.path)
    assert f"file: requests: expected at most {limit} requests per file for {endpoint.path}" in problems_of(
        excinfo
    )


@pytest.mark.parametrize(
    ("spec", "endpoint"),
    [(s, e) for s, e in ENDPOINTS if e.max_file_bytes is not None],
    ids=[i for (s, e), i in zip(ENDPOINTS, ENDPOINT_IDS, strict=True) if e.max_file_bytes is not None],
)
def test_endpoint_byte_limit_is_tighter(tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec) -> None:
    assert endpoint.max_file_bytes is not None
    filler = "x" * (endpoint.max_file_bytes // 10)
    body = body_for(endpoint, messages=[{"role": "user", "content": filler}])
    lines = [dump(request(endpoint, n, body=body)) for n in range(1, 12)]
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(write(tmp_path, lines), spec, endpoint.path)
    assert f"file: bytes: expected at most {endpoint.max_file_bytes} bytes" in problems_of(excinfo)


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_real_request_limit(tmp_path: Path, spec: VendorSpec) -> None:
    endpoint = spec.endpoints[0]
    limit = spec.limits.max_requests
    template = dump(request(endpoint, 0, custom_id="{}")).replace(b"{}", b"%d")
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(template % n + b"\n" for n in range(limit + 1)))
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec)
    assert excinfo.value.problems == [
        f"file: requests: expected at most {limit} requests per file for {endpoint.path} "
        f"(split it with split_request_file), got {limit + 1}"
    ]


def test_real_dashscope_line_limit(tmp_path: Path) -> None:
    spec = REGISTRY["dashscope"]
    endpoint = spec.endpoints[0]
    assert spec.limits.max_line_bytes == 6 * 1024**2
    huge = dump(request(endpoint, 2, body=body_for(endpoint, max_tokens=1, pad="x" * (7 * 1024**2))))
    path = write(tmp_path, [*good_lines(endpoint, 1), huge, dump(request(endpoint, 3, method="GET"))])
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(path, spec)
    listed = problems_of(excinfo)
    assert (
        f"line 2: line: expected at most {6 * 1024**2} bytes (6 MiB) per line, got {len(huge)} bytes"
        in listed
    )
    # The reader keeps going after a line it stopped keeping: line numbers stay right.
    assert "line 3: method:" in listed


def test_problems_are_capped_and_counted(tmp_path: Path) -> None:
    spec = with_limits(REGISTRY["zhipu"], max_requests=10)
    endpoint = spec.endpoints[0]
    lines = [dump(request(endpoint, n, method="GET")) for n in range(1, 31)]
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(write(tmp_path, lines), spec, max_problems=5)
    assert excinfo.value.problems[0].startswith("file: requests:")
    assert excinfo.value.problems[1].startswith("line 1: method:")
    assert len(excinfo.value.problems) == 5
    assert excinfo.value.truncated == 26
    assert "... and 26 more" in str(excinfo.value)


def test_every_problem_is_collected(tmp_path: Path) -> None:
    spec = REGISTRY["moonshot"]
    endpoint = spec.endpoints[0]
    line = {"custom_id": "", "method": "PUT", "url": "/x", "body": {"model": 3, "n": 2}}
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(write(tmp_path, [dump(line)]), spec, endpoint.path)
    fields = [p.split(": ")[1] for p in excinfo.value.problems]
    assert fields == ["custom_id", "method", "url", "body.model", "body.n"]


# ------------------------------------------------------------------------- checking bytes as they pass


def _feed_in_pieces(check: RequestFileCheck, data: bytes, piece: int) -> list[bool]:
    return [check.feed(data[start : start + piece]) for start in range(0, len(data), piece)]


@pytest.mark.parametrize("piece", [1, 5, 64, 4096, 1 << 20])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fed_check_finds_what_validate_finds(tmp_path: Path, case: str, piece: int) -> None:
    spec = REGISTRY["dashscope"]
    checked_spec, lines, _ = CASES[case](spec, spec.endpoints[0])
    path = write(tmp_path, lines)
    with pytest.raises(InvalidRequestFileError) as validated:
        validate_request_file(path, checked_spec)
    check = RequestFileCheck(checked_spec)
    check.begin(path)

    passing = _feed_in_pieces(check, path.read_bytes(), piece)
    with pytest.raises(InvalidRequestFileError) as fed:
        check.finish()

    assert fed.value.problems == validated.value.problems
    assert fed.value.truncated == validated.value.truncated
    assert fed.value.source == str(path)
    assert check.report is None
    # Once a problem shows, feed says so: the rest of the file is still checked, never sent.
    if False in passing:
        assert not any(passing[passing.index(False) :])


@pytest.mark.parametrize("piece", [1, 7, 333, 1 << 20])
def test_fed_check_reports_what_validate_reports(tmp_path: Path, piece: int) -> None:
    spec = REGISTRY["zhipu"]
    path = write(tmp_path, good_lines(spec.endpoints[0], 200), end=b"\r\n")
    check = RequestFileCheck(spec)
    check.begin(path)

    assert all(_feed_in_pieces(check, path.read_bytes(), piece))
    report = check.finish()

    assert report == check.report == validate_request_file(path, spec)


def test_fed_check_starts_over_and_cleans_up(tmp_path: Path) -> None:
    import threading

    spec = REGISTRY["openai"]
    path = write(tmp_path, good_lines(spec.endpoints[0], 3))
    check = RequestFileCheck(spec)
    with pytest.raises(RuntimeError, match="begin"):
        check.feed(b"{}")
    check.begin(path)
    check.feed(b"\xff" * (2 << 20))  # large enough for the hashing thread; not a request file
    check.begin(path)  # a repeated upload: the unfinished pass is dropped
    check.feed(path.read_bytes())
    assert check.finish() == validate_request_file(path, spec)
    check.begin(path)
    check.feed(b"\xff" * (2 << 20))
    check.close()
    assert not [t for t in threading.enumerate() if t.name == "llmbatch-sha256" and t.is_alive()]
    with pytest.raises(RuntimeError, match="begin"):
        check.finish()


def test_fed_check_stops_at_the_limits_before_the_end(tmp_path: Path) -> None:
    spec = with_limits(REGISTRY["openai"], max_requests=3, max_file_bytes=10_000)
    line = good_lines(spec.endpoints[0], 1)[0] + b"\n"
    check = RequestFileCheck(spec)
    check.begin(tmp_path / "requests.jsonl")
    assert [check.feed(line.replace(b"req-1", b"req-%d" % n)) for n in range(1, 5)] == [True] * 3 + [False]
    check.begin(tmp_path / "requests.jsonl")
    assert check.feed(b" " * 10_000)
    assert not check.feed(b" ")


# ------------------------------------------------------------------------------------------- good files


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""], ids=["lf", "crlf", "no-final-newline"])
@pytest.mark.parametrize(("spec", "endpoint"), ENDPOINTS, ids=ENDPOINT_IDS)
@pytest.mark.usefixtures("chunk")
def test_good_file_report(tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec, ending: bytes) -> None:
    lines = good_lines(endpoint, 5)
    data = b"\r\n".join(lines) if ending == b"\r\n" else b"\n".join(lines)
    path = tmp_path / "good.jsonl"
    path.write_bytes(data + ending)
    report = validate_request_file(path, spec, endpoint.path)
    assert report == RequestFileReport(
        source=str(path),
        vendor=spec.name,
        endpoint=endpoint.path,
        lines=5,
        bytes=len(data + ending),
        model=model_for(endpoint),
        sha256=hashlib.sha256(data + ending).hexdigest(),
    )
    assert report.custom_ids_sha256 == report.sha256 == fingerprint(path)
    assert report.to_dict()["lines"] == 5


@pytest.mark.usefixtures("chunk")
def test_line_numbers_across_chunks(tmp_path: Path) -> None:
    spec = REGISTRY["openai"]
    endpoint = spec.endpoints[0]
    lines = good_lines(endpoint, 40)
    lines[36] = dump(request(endpoint, 37, url="/v1/embeddings"))
    with pytest.raises(InvalidRequestFileError) as excinfo:
        validate_request_file(write(tmp_path, lines), spec)
    assert excinfo.value.problems == [
        f'line 37: url: expected {endpoint.path!r} (the batch endpoint), got string "/v1/embeddings"'
    ]


def test_sources_of_every_kind(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath

    spec = REGISTRY["zhipu"]
    path = write(tmp_path, good_lines(spec.endpoints[0], 3))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    uri = f"file://{path}"
    for source in (str(path), path, uri, ObjectStoragePath(uri)):
        assert validate_request_file(source, spec).sha256 == digest
        assert fingerprint(source) == digest
        assert [line.custom_id for line in iter_request_lines(source)] == ["req-1", "req-2", "req-3"]
    with path.open("rb") as handle:
        assert validate_request_file(handle, "zhipu").lines == 3
        assert not handle.closed


def test_unknown_vendor_name() -> None:
    with pytest.raises(InvalidInputError, match="unknown vendor 'nope'"):
        validate_request_file(io.BytesIO(b""), "nope")


# ------------------------------------------------------------------------------------ iter + fingerprint


def test_iter_request_lines_streams_and_is_lenient(tmp_path: Path) -> None:
    endpoint = REGISTRY["dashscope"].endpoints[0]
    lines = good_lines(endpoint, 3)
    path = write(tmp_path, [b"\xef\xbb\xbf" + lines[0], b"", lines[1], lines[2]], end=b"\r\n")
    got = list(iter_request_lines(path))
    assert [r.custom_id for r in got] == ["req-1", "req-2", "req-3"]
    assert got[0].body == body_for(endpoint)
    assert got[0].url == endpoint.path


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (b'{"custom_id": "x"', "line 2: json: expected a JSON object, got malformed JSON"),
        (
            b'{"custom_id": "x", "url": "/u", "body": {"a": NaN}}',
            "line 2: json: expected strict JSON, got NaN",
        ),
        (
            b'{"custom_id": "", "url": "/u", "body": {}}',
            "line 2: custom_id: expected string should have at least",
        ),
        (b'{"custom_id": "x", "url": "/u"}', "line 2: body: expected field required"),
    ],
)
def test_iter_request_lines_names_the_bad_line(tmp_path: Path, bad: bytes, fragment: str) -> None:
    endpoint = REGISTRY["openai"].endpoints[0]
    path = write(tmp_path, [good_lines(endpoint, 1)[0], bad])
    lines = iter_request_lines(path)
    assert next(lines).custom_id == "req-1"
    with pytest.raises(InvalidRequestFileError) as excinfo:
        next(lines)
    assert fragment in problems_of(excinfo)


def test_fingerprint_streams_large_files(tmp_path: Path) -> None:
    data = b"x" * (3 * 1024**2 + 17)
    path = tmp_path / "blob.jsonl"
    path.write_bytes(data)
    assert fingerprint(path) == hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- build


def _records(form: str, endpoint: EndpointSpec, count: int) -> Iterator[dict[str, Any]]:
    for n in range(1, count + 1):
        if form == "full":
            yield request(endpoint, n)
        elif form == "body":
            yield {"custom_id": f"req-{n}", "body": body_for(endpoint)}
        elif form == "prompt":
            yield {"custom_id": f"req-{n}", "prompt": f"question {n}", "params": {"max_tokens": n}}
        else:
            yield {"custom_id": f"req-{n}", "input": f"text {n}"}


def _expected_body(form: str, endpoint: EndpointSpec, n: int, system: str | None) -> dict[str, Any]:
    model = model_for(endpoint)
    if form in ("full", "body"):
        return body_for(endpoint)
    if form == "input":
        return {"model": model, "input": f"text {n}"}
    messages = [{"role": "user", "content": f"question {n}"}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return {"model": model, "max_tokens": n, "messages": messages}


BUILD_CASES = [
    (spec, ep, form)
    for spec, ep in ENDPOINTS
    for form in ("full", "body", "prompt", "input")
    if form in ("full", "body")
    or (form == "prompt" and ep.kind in ("chat", "test"))
    or (form == "input" and ep.kind == "embeddings")
]


@pytest.mark.parametrize(
    ("spec", "endpoint", "form"),
    BUILD_CASES,
    ids=[f"{s.name}{e.path}-{f}" for s, e, f in BUILD_CASES],
)
def test_build_round_trip(tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec, form: str) -> None:
    destination = tmp_path / "out" / "requests.jsonl"
    system = "Answer briefly." if form == "prompt" else None
    report = build_request_file(
        _records(form, endpoint, 5),
        destination,
        spec,
        endpoint.path,
        model=model_for(endpoint),
        system=system,
    )
    assert report == validate_request_file(destination, spec, endpoint.path)
    assert (report.lines, report.model, report.bytes) == (5, model_for(endpoint), destination.stat().st_size)
    got = list(iter_request_lines(destination))
    assert [line.custom_id for line in got] == [f"req-{n}" for n in range(1, 6)]
    assert {(line.method, line.url) for line in got} == {("POST", endpoint.path)}
    for n, line in enumerate(got, start=1):
        assert line.body == _expected_body(form, endpoint, n, system)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["requests.jsonl"]


def test_build_generates_ids_only_when_asked(tmp_path: Path) -> None:
    spec = REGISTRY["zhipu"]
    records = [{"prompt": "a"}, {"custom_id": "mine", "prompt": "b"}, {"prompt": "c"}]
    report = build_request_file(
        iter(records), tmp_path / "r.jsonl", spec, model="glm-4", custom_id_field=None
    )
    assert report.lines == 3
    assert [r.custom_id for r in iter_request_lines(tmp_path / "r.jsonl")] == [
        "request-1",
        "mine",
        "request-3",
    ]
    with pytest.raises(InvalidRequestFileError) as excinfo:
        build_request_file(iter(records), tmp_path / "s.jsonl", spec, model="glm-4")
    assert "record 1: custom_id: expected the request's custom id, got nothing" in problems_of(excinfo)
    assert not (tmp_path / "s.jsonl").exists()


def test_build_reads_another_id_field_and_numbers(tmp_path: Path) -> None:
    spec = REGISTRY["openai"]
    records = [{"id": 10, "messages": [{"role": "user", "content": "hi"}]}, {"id": "b", "prompt": "yo"}]
    build_request_file(
        records, tmp_path / "r.jsonl", spec, model="gpt", custom_id_field="id", system="Be kind."
    )
    got = list(iter_request_lines(tmp_path / "r.jsonl"))
    assert [r.custom_id for r in got] == ["10", "b"]
    assert got[0].body["messages"][0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_build_rejects_what_the_vendor_rejects(tmp_path: Path, spec: VendorSpec) -> None:
    records = [{"custom_id": "a", "prompt": "x"}, {"custom_id": "a", "prompt": "y"}]
    destination = tmp_path / "r.jsonl"
    with pytest.raises(InvalidRequestFileError) as excinfo:
        build_request_file(records, destination, spec, model="m", params={"temperature": 0.1})
    listed = problems_of(excinfo)
    assert "line 2: custom_id: expected an id used once (it is on line 1 already)" in listed
    assert ("line 1: body.temperature" in listed) == ("temperature" in spec.forbidden_body_keys)
    assert list(tmp_path.iterdir()) == []


def test_build_reports_records_it_cannot_use(tmp_path: Path) -> None:
    spec = REGISTRY["dashscope"]
    records: list[Any] = [
        ["not", "a", "mapping"],
        {"custom_id": "b", "foo": 1},
        {"custom_id": "c", "body": {"model": "other", "messages": []}},
        {"custom_id": "d", "body": 5},
        {"custom_id": "e", "prompt": "p", "params": [1]},
        {"custom_id": "f", "prompt": object()},
    ]
    with pytest.raises(InvalidRequestFileError) as excinfo:
        build_request_file(records, tmp_path / "r.jsonl", spec, model="qwen")
    listed = problems_of(excinfo)
    assert "record 1: record: expected a mapping, got array of 3 item(s)" in listed
    expected = "expected body or prompt or messages for a chat endpoint, got the keys custom_id, foo"
    assert f"record 2: record: {expected}" in listed
    assert "record 3: body.model: expected 'qwen' (the model argument), got string \"other\"" in listed
    assert "record 4: body: expected an object, got number 5" in listed
    assert "record 5: params: expected an object of body fields" in listed
    expected = "expected a value JSON carries as it is, got a value of type object"
    assert f"record 6: body.messages[0].content: {expected}" in listed
    assert list(tmp_path.iterdir()) == []


def test_build_without_model_needs_one_in_the_body(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestFileError) as excinfo:
        build_request_file([{"custom_id": "a", "prompt": "x"}], tmp_path / "r.jsonl", "zhipu")
    assert "line 1: body.model: expected a non-empty string, got nothing" in problems_of(excinfo)


def test_build_to_object_storage(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath

    destination = ObjectStoragePath(f"file://{tmp_path}/remote/r.jsonl")
    report = build_request_file([{"custom_id": "a", "prompt": "x"}], destination, "moonshot", model="kimi")
    assert report.lines == 1
    assert report.sha256 == fingerprint(destination)
    with pytest.raises(InvalidRequestFileError):
        build_request_file(
            [{"custom_id": "a", "prompt": "x"}], destination, "moonshot", model="kimi", params={"n": 2}
        )
    assert not destination.exists()


def test_build_streams_records(tmp_path: Path) -> None:
    destination = tmp_path / "r.jsonl"
    seen: list[int] = []

    def records() -> Iterator[dict[str, Any]]:
        for n in range(3):
            # Nothing is written under the final name until every record is in.
            assert not destination.exists()
            seen.append(n)
            yield {"custom_id": f"r{n}", "prompt": "x"}

    assert build_request_file(records(), destination, "openai", model="gpt").lines == 3
    assert seen == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- split


def _lines_of(paths: list[Path]) -> list[bytes]:
    return [line for path in paths for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_split_by_requests(tmp_path: Path, spec: VendorSpec) -> None:
    endpoint = spec.endpoints[0]
    source = write(tmp_path, good_lines(endpoint, 25), name="batch.jsonl")
    parts = split_request_file(source, spec, tmp_path / "parts", max_requests=10)
    assert [p.name for p in parts] == [
        "batch.part-0001.jsonl",
        "batch.part-0002.jsonl",
        "batch.part-0003.jsonl",
    ]
    assert [validate_request_file(p, spec).lines for p in parts] == [10, 10, 5]
    assert b"".join(p.read_bytes() for p in parts) == source.read_bytes()


def test_split_by_bytes_never_splits_a_line(tmp_path: Path) -> None:
    spec = REGISTRY["zhipu"]
    endpoint = spec.endpoints[0]
    lines = [
        dump(request(endpoint, n, body=body_for(endpoint, pad="y" * (n % 7) * 10))) for n in range(1, 60)
    ]
    source = write(tmp_path, lines, end=b"")
    limit = 1000
    parts = split_request_file(source, spec, tmp_path / "parts", max_bytes=limit)
    assert len(parts) > 1
    assert all(p.stat().st_size <= limit for p in parts)
    assert b"".join(p.read_bytes() for p in parts) == source.read_bytes()
    assert sum(validate_request_file(p, spec).lines for p in parts) == 59


@pytest.mark.parametrize("spec", VENDORS, ids=[s.name for s in VENDORS])
def test_split_defaults_to_the_spec_limits(tmp_path: Path, spec: VendorSpec) -> None:
    small = with_limits(spec, max_requests=4, max_file_bytes=10_000)
    source = write(tmp_path, good_lines(spec.endpoints[0], 9))
    parts = split_request_file(source, small, tmp_path / "parts")
    assert [validate_request_file(p, small).lines for p in parts] == [4, 4, 1]


def test_split_refuses_limits_above_the_vendor_and_oversized_lines(tmp_path: Path) -> None:
    spec = REGISTRY["dashscope"]
    endpoint = spec.endpoint("/v1/chat/ds-test")
    assert endpoint is not None
    source = write(tmp_path, good_lines(endpoint, 3))
    with pytest.raises(InvalidInputError, match="max_requests must be from 1 to 100 for /v1/chat/ds-test"):
        split_request_file(source, spec, tmp_path / "p", endpoint=endpoint.path, max_requests=101)
    with pytest.raises(InvalidInputError, match="max_bytes must be from 1"):
        split_request_file(source, spec, tmp_path / "p", max_bytes=0)
    with pytest.raises(InvalidInputError, match="line 1 is over 50 bytes"):
        split_request_file(source, spec, tmp_path / "p", max_bytes=50)
    assert list((tmp_path / "p").iterdir()) == []


def test_split_to_object_storage(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath

    spec = REGISTRY["moonshot"]
    source = write(tmp_path, good_lines(spec.endpoints[0], 5))
    parts = split_request_file(source, spec, ObjectStoragePath(f"file://{tmp_path}/remote"), max_requests=2)
    assert [p.name for p in parts] == [f"requests.part-000{n}.jsonl" for n in (1, 2, 3)]
    assert b"".join(p.read_bytes() for p in parts) == source.read_bytes()
