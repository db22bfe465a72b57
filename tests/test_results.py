from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch import results_index
from airflow_provider_llmbatch.emulator.results import error_line, fake_body, success_line
from airflow_provider_llmbatch.locations import atomic_writer
from airflow_provider_llmbatch.results import ROW_STATUSES, join_results
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

VENDORS = list(REGISTRY.values())


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


def _requests(path: Path, ids: list[str], endpoint: str = "/v1/chat/completions") -> Path:
    return _write_jsonl(
        path,
        [
            {
                "custom_id": cid,
                "method": "POST",
                "url": endpoint,
                "body": {"model": "m", "messages": [{"role": "user", "content": f"hello {cid}"}]},
            }
            for cid in ids
        ],
    )


def _ok(custom_id: str, prompt: int = 3, completion: int = 2) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    body = {"choices": [{"message": {"content": f"re {custom_id}"}}], "usage": usage}
    return {"id": "x", "custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}


def _err(custom_id: str, code: str = "invalid_request", with_response: bool = True) -> dict[str, Any]:
    response = (
        {"status_code": 400, "body": {"error": {"code": code, "message": "bad"}}} if with_response else None
    )
    return {
        "id": "x",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": "bad"},
    }


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _statuses(path: Path) -> dict[str, str]:
    return {row["custom_id"]: row["status"] for row in _rows(path)}


def test_completed_with_failures_and_missing(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "b", "c", "d"])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok("a", 3, 2), _ok("c", 5, 7)])
    err = _write_jsonl(tmp_path / "err.jsonl", [_err("b")])
    dest = tmp_path / "res" / "results.jsonl"

    report = join_results(req, dest, output_file=out, error_file=err, batch_status="completed")

    rows = _rows(dest)
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded", "missing"]
    assert rows[0]["response"]["choices"][0]["message"]["content"] == "re a"
    assert rows[0]["error"] is None
    assert rows[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert rows[1]["error"] == {"code": "invalid_request", "message": "bad"}
    assert rows[3]["response"] is None
    assert rows[3]["error"]["code"] == "missing_result"
    assert report.counts == {
        "succeeded": 2,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 1,
        "total": 4,
    }
    assert report.usage == {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17}
    assert report.reconciled
    assert report.result_uri == f"file://{dest.absolute()}"
    assert set(rows[0]) == {"custom_id", "status", "response", "error", "usage", "attempts"}


@pytest.mark.parametrize(
    ("batch_status", "expected"),
    [
        ("expired", "expired"),
        ("cancelled", "cancelled"),
        ("failed", "missing"),
        ("completed", "missing"),
        (None, "missing"),
    ],
)
def test_missing_lines_take_status_from_batch_outcome(
    tmp_path: Path, batch_status: str | None, expected: str
) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "b", "c"])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok("a")])

    report = join_results(req, tmp_path / "r.jsonl", output_file=out, batch_status=batch_status)

    assert _statuses(tmp_path / "r.jsonl") == {"a": "succeeded", "b": expected, "c": expected}
    assert report.counts[expected] == 2
    assert report.reconciled


@pytest.mark.parametrize(
    ("code", "expected"), [("batch_expired", "expired"), ("batch_cancelled", "cancelled")]
)
def test_unrun_error_lines_count_as_outcome(tmp_path: Path, code: str, expected: str) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "b"])
    err = _write_jsonl(tmp_path / "err.jsonl", [_err("a", code, with_response=False), _err("b", code)])

    report = join_results(req, tmp_path / "r.jsonl", error_file=err, batch_status="completed")

    # Only a line without a response means "never ran"; one with a response is a real failure.
    assert _statuses(tmp_path / "r.jsonl") == {"a": expected, "b": "failed"}
    assert report.counts[expected] == 1


def test_no_output_files_at_all(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "b"])

    report = join_results(req, tmp_path / "r.jsonl", batch_status="expired")

    assert report.counts["expired"] == 2
    assert report.counts["total"] == 2


def test_duplicates_keep_first_and_are_counted(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "b"])
    first, second = _ok("a", 1, 1), _ok("a", 9, 9)
    out = _write_jsonl(tmp_path / "out.jsonl", [first, _ok("b"), second])
    err = _write_jsonl(tmp_path / "err.jsonl", [_err("b")])

    report = join_results(
        req, tmp_path / "r.jsonl", output_file=out, error_file=err, batch_status="completed"
    )

    rows = _rows(tmp_path / "r.jsonl")
    assert rows[0]["usage"]["prompt_tokens"] == 1
    assert rows[1]["status"] == "succeeded"
    assert report.anomalies["duplicates"] == 2
    assert sorted(report.samples["duplicates"]) == ["a", "b"]
    assert report.counts["total"] == 2
    assert report.reconciled


def test_unknown_ids_no_custom_id_and_malformed_lines(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a"])
    no_id = _ok("a")
    del no_id["custom_id"]
    out = _write_jsonl(
        tmp_path / "out.jsonl",
        [_ok("zzz"), no_id, "not json {", "[1, 2]", "", _ok("a"), {**_ok("y"), "custom_id": ""}],
    )

    report = join_results(req, tmp_path / "r.jsonl", output_file=out, batch_status="completed")

    assert report.anomalies == {
        "duplicates": 0,
        "unknown_ids": 1,
        "no_custom_id": 2,
        "malformed_lines": 2,
        "duplicate_requests": 0,
    }
    assert report.samples["unknown_ids"] == ["zzz"]
    assert _statuses(tmp_path / "r.jsonl") == {"a": "succeeded"}
    assert report.reconciled


def test_duplicate_request_ids_still_get_one_row_each(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a", "a", "b"])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok("a"), _ok("b")])

    report = join_results(req, tmp_path / "r.jsonl", output_file=out)

    assert [r["custom_id"] for r in _rows(tmp_path / "r.jsonl")] == ["a", "a", "b"]
    assert report.anomalies["duplicate_requests"] == 1
    assert report.counts["succeeded"] == 3
    assert report.reconciled


def test_shuffled_output_comes_back_in_input_order(tmp_path: Path) -> None:
    ids = [f"req-{i:04d}" for i in range(300)]
    req = _requests(tmp_path / "in.jsonl", ids)
    lines = [_ok(cid, i, 1) if i % 7 else _err(cid) for i, cid in enumerate(ids)]
    random.Random(7).shuffle(lines)
    ok = [line for line in lines if line["error"] is None]
    bad = [line for line in lines if line["error"] is not None]
    out = _write_jsonl(tmp_path / "out.jsonl", ok)
    err = _write_jsonl(tmp_path / "err.jsonl", bad)

    report = join_results(
        req, tmp_path / "r.jsonl", output_file=out, error_file=err, batch_status="completed"
    )

    rows = _rows(tmp_path / "r.jsonl")
    assert [r["custom_id"] for r in rows] == ids
    for i, row in enumerate(rows):
        assert row["status"] == ("succeeded" if i % 7 else "failed")
        if i % 7:
            assert row["usage"]["prompt_tokens"] == i
    assert report.counts["failed"] == len(bad)
    assert report.usage["prompt_tokens"] == sum(i for i in range(300) if i % 7)


@pytest.mark.parametrize("spec", VENDORS, ids=lambda s: s.name)
def test_each_vendor_line_format(tmp_path: Path, spec: VendorSpec) -> None:
    endpoint = spec.default_endpoint
    req = _requests(tmp_path / "in.jsonl", ["ok-1", "fail-1", "ok-2", "gone-1"], endpoint)
    body = {"model": "m", "messages": [{"role": "user", "content": "two words"}]}
    ok_lines = [
        success_line(spec, "batch_1", cid, fake_body("chat", cid, body, 1_700_000_000))
        for cid in ("ok-2", "ok-1")
    ]
    out = _write_jsonl(tmp_path / "out.jsonl", ok_lines)
    err = _write_jsonl(
        tmp_path / "err.jsonl",
        [
            error_line(spec, "batch_1", "fail-1", "invalid_request", "nope", with_response=True),
            error_line(spec, "batch_1", "gone-1", "batch_expired", "not run", with_response=False),
        ],
    )

    report = join_results(
        req,
        tmp_path / "r.jsonl",
        output_file=out,
        error_file=err,
        batch_status="expired",
        include_request=True,
    )

    rows = {row["custom_id"]: row for row in _rows(tmp_path / "r.jsonl")}
    assert {cid: row["status"] for cid, row in rows.items()} == {
        "ok-1": "succeeded",
        "fail-1": "failed",
        "ok-2": "succeeded",
        "gone-1": "expired",
    }
    assert rows["ok-1"]["response"]["choices"][0]["message"]["content"].startswith("echo:")
    assert rows["fail-1"]["error"] == {"code": "invalid_request", "message": "nope"}
    assert rows["ok-1"]["request"]["messages"][0]["content"] == "hello ok-1"
    assert report.usage["total_tokens"] > 0
    assert report.usage["total_tokens"] == report.usage["prompt_tokens"] + report.usage["completion_tokens"]
    assert report.anomalies["unknown_ids"] == 0
    assert report.reconciled


def test_responses_endpoint_usage_names(tmp_path: Path) -> None:
    req = _requests(tmp_path / "in.jsonl", ["a"], "/v1/responses")
    body = fake_body("responses", "a", {"model": "m", "input": "one two three"}, 1)
    out = _write_jsonl(tmp_path / "out.jsonl", [success_line(REGISTRY["openai"], "b", "a", body)])

    report = join_results(req, tmp_path / "r.jsonl", output_file=out)

    assert report.usage["prompt_tokens"] == 3
    assert report.usage["total_tokens"] == body["usage"]["total_tokens"]


def test_atomic_write_leaves_nothing_at_destination_on_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = _requests(tmp_path / "in.jsonl", [f"r{i}" for i in range(50)])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok(f"r{i}") for i in range(50)])
    dest = tmp_path / "res" / "results.jsonl"
    real_row = results_index._row
    calls = {"n": 0}

    def crashing_row(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("worker died")
        return real_row(*args, **kwargs)

    monkeypatch.setattr(results_index, "_row", crashing_row)
    with pytest.raises(RuntimeError, match="worker died"):
        join_results(req, dest, output_file=out)

    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_atomic_write_keeps_previous_file_until_commit(tmp_path: Path) -> None:
    dest = tmp_path / "results.jsonl"
    dest.write_bytes(b"old\n")

    def write_then_crash() -> None:
        with atomic_writer(dest) as handle:
            handle.write(b"new partial")
            assert dest.read_bytes() == b"old\n"
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_then_crash()

    assert dest.read_bytes() == b"old\n"
    with atomic_writer(dest) as handle:
        handle.write(b"new\n")
    assert dest.read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_object_storage_uri_destination(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath

    req = _requests(tmp_path / "in.jsonl", ["a"])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok("a")])
    uri = f"file://{tmp_path}/sub/results.jsonl"

    report = join_results(ObjectStoragePath(f"file://{req}"), uri, output_file=out)

    assert report.result_uri == uri
    assert _statuses(tmp_path / "sub" / "results.jsonl") == {"a": "succeeded"}


@pytest.fixture
def memory_scheme(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register fsspec's in-memory filesystem as a stand-in for a remote object store."""
    from airflow.sdk.io import fs
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setitem(fs._BUILTIN_SCHEME_TO_FS, "memory", lambda _conn, _opts: MemoryFileSystem())
    fs._register_filesystems.cache_clear()
    yield
    fs._register_filesystems.cache_clear()
    MemoryFileSystem.store.clear()


@pytest.mark.usefixtures("memory_scheme")
def test_remote_destination_commits_by_rename(tmp_path: Path) -> None:
    from airflow.sdk import ObjectStoragePath

    req = _requests(tmp_path / "in.jsonl", [f"r{i}" for i in range(5)])
    out = _write_jsonl(tmp_path / "out.jsonl", [_ok(f"r{i}") for i in range(5)])
    dest = ObjectStoragePath("memory://llmbatch-test/results/r.jsonl")
    (dest.parent / "keep").write_bytes(b"x")

    def write_then_crash() -> None:
        with atomic_writer(dest) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        write_then_crash()
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir()] == ["keep"]

    report = join_results(req, "memory://llmbatch-test/results/r.jsonl", output_file=out)

    assert report.result_uri == "memory://llmbatch-test/results/r.jsonl"
    assert report.counts["succeeded"] == 5
    assert len(dest.read_bytes().splitlines()) == 5
    assert sorted(p.name for p in dest.parent.iterdir()) == ["keep", "r.jsonl"]


def test_request_line_without_custom_id_is_an_error(tmp_path: Path) -> None:
    req = _write_jsonl(tmp_path / "in.jsonl", [{"method": "POST", "url": "/v1/chat/completions", "body": {}}])

    with pytest.raises(ValueError, match="line 1: custom_id"):
        join_results(req, tmp_path / "r.jsonl")
    assert not (tmp_path / "r.jsonl").exists()


def test_memory_does_not_grow_with_output_bytes(tmp_path: Path) -> None:
    ids = [f"r{i}" for i in range(40)]
    req = _requests(tmp_path / "in.jsonl", ids)
    big = "x" * 250_000
    lines = []
    for cid in ids:
        line = _ok(cid)
        line["response"]["body"]["choices"][0]["message"]["content"] = big
        lines.append(line)
    out = _write_jsonl(tmp_path / "out.jsonl", lines)
    assert out.stat().st_size > 10_000_000

    tracemalloc.start()
    try:
        join_results(req, tmp_path / "r.jsonl", output_file=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # A handful of lines in flight at most; holding the file would be > 10 MB.
    assert peak < 3_000_000
    assert (tmp_path / "r.jsonl").stat().st_size > 10_000_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    outcomes=st.lists(st.sampled_from(["ok", "err", "none", "dup"]), min_size=0, max_size=30),
    extra=st.integers(min_value=0, max_value=3),
    batch_status=st.sampled_from(["completed", "expired", "cancelled", "failed"]),
)
def test_counts_always_reconcile(
    tmp_path_factory: pytest.TempPathFactory, outcomes: list[str], extra: int, batch_status: str
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    ids = [f"id{i}" for i in range(len(outcomes))]
    req = _requests(tmp / "in.jsonl", ids)
    out_lines: list[Any] = []
    err_lines: list[Any] = []
    for cid, outcome in zip(ids, outcomes, strict=True):
        if outcome == "ok":
            out_lines.append(_ok(cid))
        elif outcome == "err":
            err_lines.append(_err(cid))
        elif outcome == "dup":
            out_lines.extend([_ok(cid), _ok(cid)])
    out_lines.extend(_ok(f"stranger{i}") for i in range(extra))
    out = _write_jsonl(tmp / "out.jsonl", out_lines)
    err = _write_jsonl(tmp / "err.jsonl", err_lines)

    report = join_results(req, tmp / "r.jsonl", output_file=out, error_file=err, batch_status=batch_status)

    assert report.counts["total"] == len(ids) == len(_rows(tmp / "r.jsonl"))
    assert sum(report.counts[s] for s in ROW_STATUSES) == len(ids)
    assert report.counts["succeeded"] == outcomes.count("ok") + outcomes.count("dup")
    assert report.counts["failed"] == outcomes.count("err")
    assert report.anomalies["duplicates"] == outcomes.count("dup")
    assert report.anomalies["unknown_ids"] == extra
