"""
Hostile request files: whatever the bytes, validation gives a report or a typed error naming the line.

Every property runs a fixed number of derandomized examples (``FUZZ``), so CI runs the same inputs
every time; ``LLMBATCH_FUZZ_EXAMPLES`` raises the count for a longer local hunt.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch import jsonl_lines, results
from airflow_provider_llmbatch.emulator.validation import scan_request_file
from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.jsonl import (
    RequestFileCheck,
    RequestFileReport,
    iter_request_lines,
    validate_request_file,
)
from airflow_provider_llmbatch.vendors import REGISTRY

EXAMPLES = int(os.environ.get("LLMBATCH_FUZZ_EXAMPLES", "300"))

# One temp file per property is rewritten for every example, so the function-scoped tmp_path is safe.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

VENDORS = sorted(REGISTRY)
PROBLEM = re.compile(r"^(line \d+|file): [\w.]+: expected .+, got .+", re.DOTALL)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    return path


def _check_outcome(path: Path, vendor: str) -> RequestFileReport | InvalidRequestFileError:
    """Validate; any exception but the typed one fails the property."""
    outcome: RequestFileReport | InvalidRequestFileError
    try:
        outcome = validate_request_file(path, vendor)
    except InvalidRequestFileError as exc:
        outcome = exc
    if isinstance(outcome, InvalidRequestFileError):
        assert outcome.problems, "a rejected file lists at least one problem"
        for problem in outcome.problems:
            assert PROBLEM.match(problem), problem
    return outcome


def _line(custom_id: str, vendor: str, **body: Any) -> dict[str, Any]:
    spec = REGISTRY[vendor]
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": spec.default_endpoint,
        "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {custom_id}"}], **body},
    }


def _encode(lines: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(line, ensure_ascii=False).encode() for line in lines]


@FUZZ
@given(data=st.binary(max_size=4096), vendor=st.sampled_from(VENDORS))
def test_arbitrary_bytes_give_a_report_or_a_typed_error(tmp_path: Path, data: bytes, vendor: str) -> None:
    _check_outcome(_write(tmp_path, data), vendor)


@FUZZ
@given(
    data=st.lists(
        st.sampled_from([b"{", b"}", b"[", b"]", b'"', b":", b",", b"\n", b"\r", b"\xef\xbb\xbf", b"\xff"])
        | st.sampled_from([b"NaN", b"-Infinity", b"1e999", b'"custom_id"', b'"body"', b"null", b"\\u"]),
        max_size=200,
    ).map(b"".join),
    vendor=st.sampled_from(VENDORS),
)
def test_json_shaped_noise_gives_a_report_or_a_typed_error(tmp_path: Path, data: bytes, vendor: str) -> None:
    _check_outcome(_write(tmp_path, data), vendor)


def _fed_outcome(data: bytes, cuts: list[int], vendor: str, path: Path) -> RequestFileReport | list[str]:
    """Feed ``data`` to a check in pieces split at ``cuts``; return the report or the problems."""
    check = RequestFileCheck(vendor)
    check.begin(path)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        check.feed(data[start:end])
    try:
        return check.finish()
    except InvalidRequestFileError as exc:
        return exc.problems


@FUZZ
@given(
    lines=st.lists(
        st.sampled_from(
            [b"good", b"dup", b"no-model", b"other-model", b"blank", b"bad-json", b"latin1", b"bom"]
        ),
        min_size=0,
        max_size=30,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
    crlf=st.booleans(),
    vendor=st.sampled_from(VENDORS),
)
def test_checked_as_it_streams_in_any_pieces_is_checked_as_validated(
    tmp_path: Path, lines: list[bytes], cuts: list[int], crlf: bool, vendor: str
) -> None:
    # An upload feeds the check its chunks as they go out; wherever the chunks break, the verdict and
    # every message are those of validate_request_file.
    made = []
    for n, kind in enumerate(lines):
        line = _encode([_line(f"id-{n}", vendor)])[0]
        if kind == b"dup":
            line = _encode([_line("id-0", vendor)])[0]
        elif kind == b"no-model":
            line = line.replace(b'"model": "m", ', b"")
        elif kind == b"other-model":
            line = line.replace(b'"model": "m"', b'"model": "m2"')
        elif kind == b"blank":
            line = b""
        elif kind == b"bad-json":
            line = line[:-3]
        elif kind == b"latin1":
            line = line.replace(b"hi ", b"h\xe9 ")
        elif kind == b"bom":
            line = b"\xef\xbb\xbf" + line
        made.append(line)
    data = (b"\r\n" if crlf else b"\n").join(made) + (b"\n" if made else b"")
    path = _write(tmp_path, data)
    validated = _check_outcome(path, vendor)
    expected = validated.problems if isinstance(validated, InvalidRequestFileError) else validated

    assert _fed_outcome(data, cuts, vendor, path) == expected


@FUZZ
@given(data=st.binary(max_size=2048))
def test_iterating_arbitrary_bytes_yields_requests_or_a_typed_error(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path, data)
    problems: list[str] = []
    try:
        list(iter_request_lines(path))
    except InvalidRequestFileError as exc:
        problems = exc.problems
    assert all(PROBLEM.match(p) for p in problems), problems


MUTATIONS = [
    "bom",
    "crlf",
    "nan",
    "duplicate_key",
    "deep",
    "invalid_utf8",
    "custom_id",
    "method",
    "url",
    "body",
    "model",
    "truncate",
    "unknown_key",
]


def _wrong(field: str, value: Any, vendor: str) -> bool:
    """Return True when ``value`` is not acceptable for ``field`` (so the line must be rejected)."""
    if field in ("custom_id", "model"):
        return type(value) is not str or value == ""
    if field == "method":
        return value != "POST"
    if field == "url":
        return value != REGISTRY[vendor].default_endpoint
    return type(value) is not dict


@FUZZ
@given(
    count=st.integers(min_value=1, max_value=6),
    at=st.integers(min_value=0, max_value=5),
    mutation=st.sampled_from(MUTATIONS),
    vendor=st.sampled_from(VENDORS),
    value=json_values,
    position=st.floats(min_value=0.0, max_value=1.0),
    depth=st.integers(min_value=2_000, max_value=50_000),
    bad_byte=st.sampled_from(
        [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80"]
    ),
)
def test_one_mutation_of_a_valid_file_is_named_or_harmless(
    tmp_path: Path,
    count: int,
    at: int,
    mutation: str,
    vendor: str,
    value: Any,
    position: float,
    depth: int,
    bad_byte: bytes,
) -> None:
    at = at % count
    lineno = at + 1
    lines = [_line(f"req-{i}", vendor) for i in range(count)]
    encoded = _encode(lines)
    expect_line: int | None = lineno
    field = mutation
    if mutation == "bom":
        encoded[0] = b"\xef\xbb\xbf" + encoded[0]
        expect_line, field = 1, "encoding"
    elif mutation == "crlf":
        encoded = [raw + b"\r" for raw in encoded]
        expect_line = None
    elif mutation == "nan":
        token = ["NaN", "Infinity", "-Infinity"][at % 3]
        encoded[at] = encoded[at][:-2] + f',"temperature":{token}}}}}'.encode()
        field = "json"
    elif mutation == "duplicate_key":
        # Decided behaviour: the last value of a repeated key wins, as in every mainstream JSON parser
        # (and in the results join), so the file stays valid and the id is the last one.
        encoded[at] = b'{"custom_id":"shadowed",' + encoded[at][1:]
        expect_line = None
    elif mutation == "deep":
        encoded[at] = encoded[at][:-2] + b',"x":' + b"[" * depth + b"]" * depth + b"}}"
        field = "json"
    elif mutation == "invalid_utf8":
        raw = encoded[at]
        cut = 1 + int(position * (len(raw) - 2))
        encoded[at] = raw[:cut] + bad_byte + raw[cut:]
        field = ""
    elif mutation in ("custom_id", "method", "url", "body"):
        assume(_wrong(mutation, value, vendor))
        lines[at][mutation] = value
        encoded = _encode(lines)
    elif mutation == "model":
        assume(_wrong("model", value, vendor))
        lines[at]["body"]["model"] = value
        encoded = _encode(lines)
        field = "body.model"
    elif mutation == "truncate":
        raw = encoded[at]
        encoded[at] = raw[: int(position * (len(raw) - 1))]
        field = ""
    elif mutation == "unknown_key":
        lines[at]["extra"] = value
        encoded = _encode(lines)
        field = "extra"
    path = _write(tmp_path, b"\n".join(encoded) + b"\n")

    outcome = _check_outcome(path, vendor)

    if expect_line is None:
        assert isinstance(outcome, RequestFileReport), outcome
        assert outcome.lines == count
        if mutation == "duplicate_key":
            # The join reads the same id the validator checked.
            ids = [cid for cid, _ in results._iter_requests(path)]
            assert ids == [f"req-{i}" for i in range(count)]
        return
    assert isinstance(outcome, InvalidRequestFileError), f"{mutation} at line {lineno} was accepted"
    named = [p for p in outcome.problems if p.startswith(f"line {expect_line}: ")]
    assert named, outcome.problems
    if field:
        assert any(p.startswith(f"line {expect_line}: {field}:") for p in named), named
    if mutation == "nan":
        assert any("JSON does not allow" in p for p in named), named


@FUZZ
@given(raw=st.binary(max_size=512), error=st.sampled_from([ValueError("x"), RecursionError("deep")]))
def test_diagnosis_of_any_unparsable_line_is_a_triple(raw: bytes, error: Exception) -> None:
    field, expected, got = jsonl_lines.diagnose_unparsable(raw, error)
    assert field in ("encoding", "json")
    assert expected
    assert got


@pytest.mark.timeout(120)
@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("vendor", VENDORS)
def test_very_deep_nesting_is_a_line_problem(tmp_path: Path, vendor: str, depth: int) -> None:
    line = _encode([_line("deep", vendor)])[0]
    line = line[:-2] + b',"x":' + b"[" * depth + b"]" * depth + b"}}\n"
    path = _write(tmp_path, _encode([_line("ok", vendor)])[0] + b"\n" + line)

    with pytest.raises(InvalidRequestFileError) as info:
        validate_request_file(path, vendor)
    assert info.value.problems == [
        "line 2: json: expected a JSON object nested less deeply, "
        "got nesting deeper than the JSON parser allows"
    ]
    with pytest.raises(InvalidRequestFileError, match="line 2: json"):
        list(iter_request_lines(path))


FIFTY_MB = 50 * 1024 * 1024


@pytest.mark.timeout(240)
@pytest.mark.parametrize("vendor", VENDORS)
def test_fifty_megabyte_line_is_checked_in_bounded_memory(tmp_path: Path, vendor: str) -> None:
    spec = REGISTRY[vendor]
    head = json.dumps(_line("big", vendor))[:-2].encode() + b',"pad":"'
    path = tmp_path / "big.jsonl"
    with path.open("wb") as handle:
        handle.write(head)
        for _ in range(FIFTY_MB // (1 << 20)):
            handle.write(b"a" * (1 << 20))
        handle.write(b'"}}\n')
    size = path.stat().st_size - 1
    limit = spec.limits.max_line_bytes
    tracemalloc.start()
    try:
        try:
            report: RequestFileReport | None = validate_request_file(path, vendor)
        except InvalidRequestFileError as exc:
            report = None
            problems = exc.problems
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if limit is not None and size > limit:
        assert report is None
        assert problems == [
            f"line 1: line: expected at most {limit} bytes (6 MiB) per line, got {size} bytes"
        ]
        # Past the limit only the first bytes of the line are kept (plus a few chunks in flight).
        assert peak < 32 * 1024 * 1024, peak
    else:
        assert report is not None
        assert report.lines == 1
        # The line itself and its parse, never a multiple of the file.
        assert peak < 3 * FIFTY_MB, peak


@pytest.mark.timeout(120)
def test_file_without_newlines_is_read_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "noise.jsonl"
    with path.open("wb") as handle:
        for _ in range(FIFTY_MB // (1 << 20)):
            handle.write(b"\x00{[" * ((1 << 20) // 3))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestFileError, match="line 1: "):
            validate_request_file(path, "dashscope")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, peak


def test_a_source_that_is_not_a_file_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError):
        validate_request_file(12345, "openai")  # type: ignore[arg-type]


@pytest.mark.parametrize("vendor", VENDORS)
def test_the_emulator_rejects_a_deep_line_like_a_vendor(tmp_path: Path, vendor: str) -> None:
    line = _encode([_line("deep", vendor)])[0]
    path = _write(tmp_path, line[:-2] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n")

    info = scan_request_file(path, REGISTRY[vendor], None, re.compile("^fail"))

    assert [(p.code, p.line) for p in info.problems] == [("invalid_json", 1)]
    assert "nested too deeply" in info.problems[0].message
