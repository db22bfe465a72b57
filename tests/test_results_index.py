"""
The results join's on-disk index and its two JSON codecs.

``tests/test_results.py`` covers the rows and anomalies case by case; this module checks the join
against a plain in-memory reference (the rules written the simple way) on many shuffled lines, that
msgspec and the standard library give the same rows, that the temporary index never outlives the
join, and that memory does not grow with the number of lines.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch import codec, results, results_index
from airflow_provider_llmbatch.result_lines import ResultLine, read_result_line
from airflow_provider_llmbatch.results import ROW_STATUSES, JoinReport, join_results

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- a reference join: the rules written the simple way, everything in memory -------------------------


def _strict(raw: bytes) -> Any:
    def reject(token: str) -> Any:
        raise ValueError(token)

    def finite(text: str) -> float:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(text)
        return value

    return json.loads(raw, parse_constant=reject, parse_float=finite)


def _reference(
    requests: Path, files: list[Path], batch_status: str | None, include_request: bool
) -> tuple[bytes, dict[str, Any]]:
    """Join as the provider always has: an in-memory dict of first lines, ResultLine for each."""
    anomalies: dict[str, list[str]] = {}
    index: dict[str, ResultLine] = {}
    for path in files:
        offset = 0
        for raw in path.read_bytes().splitlines(keepends=True):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                data = _strict(raw)
            except (ValueError, RecursionError):
                data = None
            if not isinstance(data, dict):
                anomalies.setdefault("malformed_lines", []).append(f"{path.name}@{start}")
                continue
            value = data.get("custom_id")
            if value is None or value == "" or isinstance(value, dict | list):
                anomalies.setdefault("no_custom_id", []).append(f"{path.name}@{start}")
            elif str(value) in index:
                anomalies.setdefault("duplicates", []).append(str(value))
            else:
                index[str(value)] = ResultLine.model_validate(data)
    missing = {"expired": "expired", "cancelled": "cancelled"}.get(batch_status or "", "missing")
    rows = []
    used: set[str] = set()
    seen: set[str] = set()
    usage = dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), 0)
    for raw in requests.read_bytes().splitlines():
        if not raw.strip():
            continue
        request = json.loads(raw)
        custom_id, body = str(request["custom_id"]), request.get("body")
        if custom_id in seen:
            anomalies.setdefault("duplicate_requests", []).append(custom_id)
        seen.add(custom_id)
        line = index.get(custom_id)
        if line is None:
            code, message = results._MISSING_ERROR[missing]  # type: ignore[index]
            row: dict[str, Any] = {
                "custom_id": custom_id,
                "status": missing,
                "response": None,
                "error": {"code": code, "message": message},
                "usage": {},
            }
        else:
            used.add(custom_id)
            status, error = "succeeded", None
            if not line.succeeded:
                status = "failed"
                error = {"code": line.error_code, "message": line.error_message or "request failed"}
                if line.response is None and line.error_code in ("batch_expired", "batch_cancelled"):
                    status = line.error_code.removeprefix("batch_")
            row = {
                "custom_id": custom_id,
                "status": status,
                "response": line.response.body if line.response is not None else None,
                "error": error,
                "usage": line.usage,
            }
            prompt = line.usage.get("prompt_tokens", line.usage.get("input_tokens", 0))
            completion = line.usage.get("completion_tokens", line.usage.get("output_tokens", 0))
            usage["prompt_tokens"] += prompt
            usage["completion_tokens"] += completion
            usage["total_tokens"] += line.usage.get("total_tokens", prompt + completion)
        row["attempts"] = 1
        if include_request:
            row["request"] = body if isinstance(body, dict) else None
        rows.append(row)
    anomalies["unknown_ids"] = [cid for cid in index if cid not in used]
    text = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ROW_STATUSES}
    return text.encode("utf-8", "backslashreplace"), {
        "counts": {**counts, "total": len(rows)},
        "usage": usage,
        "anomalies": {kind: len(found) for kind, found in anomalies.items() if found},
        "samples": {kind: found[:5] for kind, found in anomalies.items() if found},
    }


def _report(report: JoinReport) -> dict[str, Any]:
    return {
        "counts": report.counts,
        "usage": report.usage,
        "anomalies": {kind: n for kind, n in report.anomalies.items() if n},
        "samples": report.samples,
    }


# -- vendor files with every kind of line, in any order -------------------------------------------------


def _ok(custom_id: Any, i: int) -> dict[str, Any]:
    usage = {"prompt_tokens": i, "completion_tokens": 2, "total_tokens": i + 2}
    body = {"choices": [{"message": {"content": f"ré {custom_id} 中文"}}], "usage": usage, "score": i / 7}
    return {"id": "x", "custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}


def _failed(custom_id: Any, code: str = "invalid_request", with_response: bool = True) -> dict[str, Any]:
    response = {"status_code": 400, "body": {"error": {"code": code, "message": "bad"}}}
    return {
        "id": "x",
        "custom_id": custom_id,
        "response": response if with_response else None,
        "error": {"code": code, "message": "bad"},
    }


def _build(tmp: Path, count: int, seed: int) -> tuple[Path, list[Path], list[str]]:
    """Write a request file and output/error files with duplicates, strangers and broken lines."""
    rng = random.Random(seed)
    ids = [f"req-{i:05d}" for i in range(count)] + ['quote"d', "tab\tid", "ünï", "42"]
    requests = [*ids, ids[-1], ids[-3]]  # two repeated request ids
    out: list[bytes] = []
    err: list[bytes] = []
    for i, cid in enumerate(ids):
        roll = rng.random()
        line = _ok(cid, i) if roll < 0.7 else _failed(cid) if roll < 0.85 else None
        if roll > 0.95:
            line = _failed(cid, "batch_expired", with_response=False)
        if line is None:
            continue  # no line at all: missing
        target = out if line["error"] is None else err
        target.append(json.dumps(line, ensure_ascii=rng.random() < 0.5).encode())
        if rng.random() < 0.03:
            (err if target is out else out).append(json.dumps(_failed(cid)).encode())  # a cross-file copy
        if rng.random() < 0.03:
            target.append(json.dumps(_ok(cid, 10_000 + i)).encode())  # a later copy
    out += [json.dumps(_ok(f"stranger-{i}", i)).encode() for i in range(7)]
    out += [b'{"custom_id": "x", "response": {"body": {"v": NaN}}}', b"not json", b"[1, 2]", b"   "]
    out += [json.dumps({**_ok("y", 1), "custom_id": None}).encode(), b'{"custom_id": 7, "error": "boom"}']
    out.append(b'{"custom_id": "deep", "x": ' + b"[" * 600 + b"]" * 600 + b"}")
    rng.shuffle(out)
    rng.shuffle(err)
    paths = [tmp / "out.jsonl", tmp / "err.jsonl"]
    paths[0].write_bytes(b"\n".join(out) + b"\n")
    paths[1].write_bytes(b"\r\n".join(err))
    request_path = tmp / "requests.jsonl"
    request_path.write_bytes(
        b"".join(
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/x", "body": {"n": n}}).encode()
            + b"\n"
            for n, cid in enumerate(requests)
        )
    )
    return request_path, paths, requests


@pytest.mark.parametrize("include_request", [False, True])
@pytest.mark.parametrize("fast", [True, False], ids=["msgspec", "json"])
def test_many_shuffled_lines_join_exactly_like_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, include_request: bool, fast: bool
) -> None:
    if not fast:
        # Every line too deep for msgspec: json reads them all.
        monkeypatch.setattr(codec, "_shallow", lambda raw: False)
    # More lines than one batch, so ids repeat across batches of lines and of requests.
    requests, files, ids = _build(tmp_path, 3000, seed=11)
    destination = tmp_path / "results.jsonl"

    report = join_results(
        requests,
        destination,
        output_file=files[0],
        error_file=files[1],
        batch_status="expired",
        include_request=include_request,
    )

    expected_rows, expected_report = _reference(requests, files, "expired", include_request)
    assert destination.read_bytes() == expected_rows
    assert _report(report) == expected_report
    assert [json.loads(line)["custom_id"] for line in destination.read_bytes().splitlines()] == ids
    assert report.anomalies["duplicate_requests"] == 2
    assert report.anomalies["unknown_ids"] == 9  # seven strangers, "7" and the deep line
    assert report.reconciled


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), count=st.integers(min_value=0, max_value=60))
def test_any_shuffle_joins_like_the_reference(
    tmp_path_factory: pytest.TempPathFactory, seed: int, count: int
) -> None:
    tmp = tmp_path_factory.mktemp("shuffle")
    requests, files, _ = _build(tmp, count, seed)

    report = join_results(requests, tmp / "r.jsonl", output_file=files[0], error_file=files[1])

    expected_rows, expected_report = _reference(requests, files, None, False)
    assert (tmp / "r.jsonl").read_bytes() == expected_rows
    assert _report(report) == expected_report


def test_a_copy_in_the_error_file_loses_to_the_output_line(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"custom_id": c, "body": {}}) + "\n" for c in ("a", "b", "c")))
    out = tmp_path / "out.jsonl"
    err = tmp_path / "err.jsonl"
    # The error file's lines come first in it; the output file is still read first.
    err.write_text("".join(json.dumps(_failed(c)) + "\n" for c in ("c", "a", "b")))
    out.write_text("".join(json.dumps(_ok(c, 1)) + "\n" for c in ("b", "a")))

    report = join_results(requests, tmp_path / "r.jsonl", output_file=out, error_file=err)

    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["custom_id"], r["status"]) for r in rows] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "failed"),
    ]
    assert report.anomalies["duplicates"] == 2
    assert report.samples["duplicates"] == ["a", "b"]  # in the order of the losing lines
    assert report.anomalies["unknown_ids"] == 0


# -- the temporary index --------------------------------------------------------------------------------


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the temporary directory at an empty folder the test can look into."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_index_is_removed_after_a_join(
    tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests, files, _ = _build(tmp_path, 50, seed=3)
    made: list[str] = []
    real_index = results_index.ResultIndex

    def spy(directory: str) -> results_index.ResultIndex:
        made.append(directory)
        return real_index(directory)

    monkeypatch.setattr(results_index, "ResultIndex", spy)
    join_results(requests, tmp_path / "r.jsonl", output_file=files[0], error_file=files[1])

    assert len(made) == 1
    assert Path(made[0]).parent == scratch
    assert list(scratch.iterdir()) == []


def test_index_is_removed_when_the_join_fails(
    tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests, files, _ = _build(tmp_path, 700, seed=5)
    real_row = results_index._row
    calls = {"n": 0}

    def crashing_row(*args: Any) -> bytes:
        calls["n"] += 1
        if calls["n"] == 600:
            raise RuntimeError("worker died")
        return real_row(*args)

    monkeypatch.setattr(results_index, "_row", crashing_row)
    with pytest.raises(RuntimeError, match="worker died"):
        join_results(requests, tmp_path / "out" / "r.jsonl", output_file=files[0], error_file=files[1])

    assert list(scratch.iterdir()) == []
    assert list((tmp_path / "out").iterdir()) == []


def test_index_is_removed_when_a_request_line_is_broken(tmp_path: Path, scratch: Path) -> None:
    requests, files, _ = _build(tmp_path, 20, seed=5)
    with requests.open("ab") as handle:
        handle.write(b'{"method": "POST"}\n')

    with pytest.raises(ValueError, match="custom_id"):
        join_results(requests, tmp_path / "r.jsonl", output_file=files[0], error_file=files[1])

    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "r.jsonl").exists()


# -- memory -----------------------------------------------------------------------------------------------


def _write_batch(tmp: Path, count: int) -> tuple[Path, Path]:
    requests = tmp / "requests.jsonl"
    out = tmp / "out.jsonl"
    order = list(range(count))
    random.Random(count).shuffle(order)  # the worst case: no line where its request is
    with requests.open("w") as req, out.open("w") as res:
        for i in range(count):
            req.write(json.dumps({"custom_id": f"r{i}", "body": {"p": "x" * 200}}) + "\n")
        for i in order:
            res.write(json.dumps(_ok(f"r{i}", i)) + "\n")
    return requests, out


def test_memory_does_not_grow_with_the_line_count(tmp_path: Path) -> None:
    peaks = []
    for count in (2_000, 16_000):
        tmp = tmp_path / str(count)
        tmp.mkdir()
        requests, out = _write_batch(tmp, count)
        tracemalloc.start()
        try:
            join_results(requests, tmp / "r.jsonl", output_file=out)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # Eight times the lines: the same batches in flight, plus one byte per line.
    assert peaks[1] < peaks[0] * 1.25 + 16_000, peaks
    assert peaks[1] < 3_000_000, peaks


# -- the codecs ---------------------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
    | st.sampled_from(["\x00\x1f", "\u2028", "\x7f", 'q"\\', "</x>", "😀"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, ensure_ascii=st.booleans(), spaced=st.booleans())
def test_msgspec_reads_and_writes_lines_as_json_does(value: Any, ensure_ascii: bool, spaced: bool) -> None:
    raw = json.dumps(
        {"custom_id": "a", "v": value},
        ensure_ascii=ensure_ascii,
        separators=(", ", ": ") if spaced else (",", ":"),
    )
    parsed = codec.parse_vendor_line(raw.encode())
    assert parsed == _strict(raw.encode())
    expected = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
    assert codec.to_json(parsed) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": NaN}',
        b'{"a": 1e999}',
        b'{"a": -Infinity}',
        b'{"a": "\\ud800"}',
        b'{"a": "\xed\xa0\x80"}',
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": 1, "a": 2.5e16}',
        b'{"a": ' + b"1" * 5000 + b"}",
        b'{"a": "x\x01"}',
        b'{"a": 1}\x0c',
        b'{"a": ' + b"[" * 600 + b"]" * 600 + b"}",
        b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        '{"a": "é"}'.encode("utf-16"),
    ],
)
def test_vendor_lines_msgspec_refuses_are_read_by_json(raw: bytes) -> None:
    try:
        expected: Any = _strict(raw)
    except (ValueError, RecursionError) as exc:
        expected = type(exc)
    try:
        got: Any = codec.parse_vendor_line(raw)
    except (ValueError, RecursionError) as exc:
        got = type(exc)
    if isinstance(expected, type):
        assert got in (ValueError, RecursionError) or issubclass(got, ValueError)
    else:
        assert got == expected
        assert codec.to_json(got) == codec._utf8(codec._ENCODE(expected))


@pytest.mark.parametrize(
    "line",
    [
        b'{"custom_id":"a","body":{"x":"\xff"}}',
        b'{"custom_id":"a","body":{"x":' + b"9" * 5000 + b"}}",
        b'{"custom_id":"a","body":{"x":NaN}}',
        b'{"custom_id":"a","body":{"x":"\\ud800"}}',
        b'{"custom_id":"a","custom_id":"b","body":{}}',
        b'{"custom_id":"a","body":{},"custom\\u005fid":"c"}',
        b'{"custom_id":1e400,"body":{}}',
        b'{"custom_id":5,"body":{"t":0.5}}',
        b'{"custom_id":{"k":[1]},"body":[]}',
        b'\xef\xbb\xbf{"custom_id":"bom"}',
        b'{"custom_id":"","body":{}}',
        b'{"body":{}}',
        b"[1]",
        b'{"custom_id":"deep","body":' + b"[" * 600 + b"]" * 600 + b"}",
    ],
)
@pytest.mark.parametrize("with_body", [False, True])
def test_request_lines_read_the_same_with_either_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: bytes, with_body: bool
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(line + b"\n")

    def read() -> str:
        try:
            return repr(list(results._iter_requests(path, with_body=with_body)))  # repr: NaN != NaN
        except ValueError as exc:
            return str(exc)

    fast = read()
    monkeypatch.setattr(codec, "_shallow", lambda raw: False)
    assert read() == fast


@SETTINGS
@given(
    line=st.fixed_dictionaries(
        {},
        optional={
            "response": st.none()
            | st.text(max_size=3)
            | st.fixed_dictionaries(
                {},
                optional={
                    "status_code": st.none() | st.integers(-1, 600) | st.floats() | st.text(max_size=4),
                    "body": JSON_VALUES,
                },
            ),
            "error": st.none() | st.text(max_size=5) | JSON_VALUES,
        },
    )
)
def test_read_result_line_is_what_the_model_reads(line: dict[str, Any]) -> None:
    model = ResultLine.model_validate(line)
    outcome = read_result_line(line)
    assert outcome.succeeded == model.succeeded
    assert outcome.error_code == model.error_code
    assert outcome.error_message == model.error_message
    assert outcome.has_response == (model.response is not None)
    assert outcome.body == (model.response.body if model.response is not None else None)
    assert outcome.usage == model.usage


# -- values the old join could not write ----------------------------------------------------------------


def test_lone_surrogates_and_huge_token_counts_are_written(tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"custom_id":"a","body":{}}\n{"custom_id":"b","body":{}}\n')
    out = tmp_path / "out.jsonl"
    huge = 2**70
    body_a = '{"text": "\\ud800 alone", "usage": {"prompt_tokens": ' + str(huge) + ', "total_tokens": 1}}'
    line_a = '{"custom_id": "a", "response": {"status_code": 200, "body": ' + body_a + "}}"
    out.write_text(line_a + "\n" + json.dumps(_ok("b", 3)) + "\n")

    report = join_results(requests, tmp_path / "r.jsonl", output_file=out)

    text = (tmp_path / "r.jsonl").read_bytes().decode("utf-8")  # valid UTF-8: the surrogate is escaped
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows[0]["response"]["text"] == "\ud800 alone"
    assert report.usage["prompt_tokens"] == huge + 3
    assert report.usage["total_tokens"] == 1 + 5
    digest = hashlib.sha256(text.encode()).hexdigest()
    report_again = join_results(requests, tmp_path / "r.jsonl", output_file=out)
    assert hashlib.sha256((tmp_path / "r.jsonl").read_bytes()).hexdigest() == digest
    assert report_again.usage == report.usage
