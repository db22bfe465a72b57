"""
Edges of the merged fetch over parts and rounds (README "Large jobs", "Failed rows"): duplicate ids
across parts, joined request files the vendor serves, part ends from metadata, rounds split into several
batches and retried between them, rounds with include_request and Parquet, and the file quota of a retry
whose upload was deleted.

Every test talks to the slow emulator and counts what it stored.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import BatchOutcomeError, InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators import results as results_op
from airflow_provider_llmbatch.operators.reattach import REQUESTS_METADATA
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    STORES,
    FakeStateStore,
    FakeTI,
    die_on_call,
    hold_files,
    make_context,
    parts_op,
    state_store,
    uploads_and_batches,
    write_requests,
)
from tests.pollkit import Clock

# -- helpers ------------------------------------------------------------------------------------------


def _line(custom_id: str) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": REGISTRY["openai"].default_endpoint,
            "body": {"model": "test-model", "messages": [{"role": "user", "content": f"say {custom_id}"}]},
        }
    )


def _job(
    tmp_path: Path, parts: list[list[str]], *, raw: list[bytes] | None = None, **create: Any
) -> tuple[list[str], Path]:
    """Create one openai batch per part (made elsewhere: no provider metadata); return ids and whole file."""
    spec = REGISTRY["openai"]
    whole = write_requests(tmp_path / "requests.jsonl", spec, [i for p in parts for i in p])
    ids = []
    with BatchHook(CONN_ID) as hook:
        for n, part in enumerate(parts):
            path = tmp_path / f"part-{n}.jsonl"
            if raw is not None:
                path.write_bytes(raw[n])
            else:
                write_requests(path, spec, part)
            ids.append(hook.create_batch(input_file_id=hook.upload_file(str(path)).id, **create).id)
    return ids, whole


def _fetch(
    ids: list[str], tmp_path: Path, input_file: Path | str | None, state: Any = None, **kwargs: Any
) -> dict[str, Any]:
    kwargs.setdefault("destination", str(tmp_path / "results.jsonl"))
    op = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=ids,
        input_file=None if input_file is None else str(input_file),
        deferrable=False,
        poll_interval=60,
        **kwargs,
    )
    return op.execute(make_context(FakeTI(task_id="fetch"), state))


def _rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    text = Path(manifest["result_uri"].removeprefix("file://")).read_text()
    return [json.loads(line) for line in text.splitlines()]


def _content(row: dict[str, Any]) -> str:
    return row["response"]["choices"][0]["message"]["content"]


def _mark_lines(monkeypatch: pytest.MonkeyPatch, edit: Any) -> None:
    """Edit each downloaded output file: ``edit(name, lines)`` (``0-1.out.jsonl``: round 0, batch 1)."""
    real = results_op.download

    def download(hook: Any, file_id: str | None, path: Path, log: Any) -> Path | None:
        got = real(hook, file_id, path, log)
        if got is not None:
            lines = [json.loads(line) for line in got.read_text().splitlines() if line.strip()]
            got.write_text("".join(json.dumps(line) + "\n" for line in edit(path.name, lines)))
        return got

    monkeypatch.setattr(results_op, "download", download)


def _say(line: dict[str, Any], text: str) -> dict[str, Any]:
    line = json.loads(json.dumps(line))
    line["response"]["body"]["choices"][0]["message"]["content"] = text
    return line


def _complete(emu: Emulator, ids: list[str], statuses: list[str] | None = None) -> None:
    for batch_id, status in zip(ids, statuses or ["completed"] * len(ids), strict=True):
        emu.force_status("openai", batch_id, status)


# -- duplicate request ids across parts ---------------------------------------------------------------


def test_a_duplicate_id_across_parts_with_lines_gets_each_parts_own_answer_and_is_counted(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    parts = [["a0", "x", "a2"], ["x", "b1"]]
    ids, whole = _job(tmp_path, parts)
    _complete(emu, ids)
    _mark_lines(
        monkeypatch,
        lambda name, lines: [_say(ln, f"{name}:{ln['custom_id']}") for ln in lines],
    )

    manifest = _fetch(ids, tmp_path, whole)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ["a0", "x", "a2", "x", "b1"]
    assert _content(rows[1]) == "0-0.out.jsonl:x"  # part 1's x: part 1's line
    assert _content(rows[3]) == "0-1.out.jsonl:x"  # part 2's x: part 2's line
    assert manifest["anomalies"]["unknown_ids"] == 0
    # JoinReport: duplicate_requests counts ids repeated in the request file.
    assert manifest["anomalies"]["duplicate_requests"] == 1


@pytest.mark.parametrize("silent", [0, 1])
def test_a_duplicate_id_across_parts_one_without_a_line_is_counted(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent: int
) -> None:
    emu = connect("openai")
    parts = [["a0", "x"], ["x", "b1"]]
    ids, whole = _job(tmp_path, parts)
    # The part without lines expired before it ran, and its error file is dropped: no line at all.
    statuses = ["completed", "completed"]
    statuses[silent] = "expired"
    _complete(emu, ids, statuses)
    dropped = emu.batch("openai", ids[silent])["error_file_id"]
    real = results_op.download
    monkeypatch.setattr(
        results_op,
        "download",
        lambda hook, file_id, path, log: None if file_id == dropped else real(hook, file_id, path, log),
    )

    manifest = _fetch(ids, tmp_path, whole)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ["a0", "x", "x", "b1"]
    expected = [["succeeded", "succeeded"], ["succeeded", "succeeded"]]
    expected[silent] = ["expired", "expired"]
    assert [r["status"] for r in rows] == expected[0] + expected[1]
    assert manifest["anomalies"]["unknown_ids"] == 0
    assert manifest["anomalies"]["duplicate_requests"] == 1


def test_a_round_for_an_id_that_two_parts_hold(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("openai")
    # retry-x is rate limited the first time it runs (part 1), not the second (part 2).
    parts = [["a0", "retry-x"], ["retry-x", "b1"]]
    ids, whole = _job(tmp_path, parts)
    _complete(emu, ids)
    first = _fetch(ids, tmp_path / "plain", whole, destination=str(tmp_path / "plain.jsonl"))
    assert [r["status"] for r in _rows(first)] == ["succeeded", "failed", "succeeded", "succeeded"]

    manifest = _fetch(ids, tmp_path, whole, resubmit_failed=1)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ["a0", "retry-x", "retry-x", "b1"]
    assert {r["status"] for r in rows} == {"succeeded"}
    sent = (tmp_path / "results.round-1.requests.jsonl").read_text().splitlines()
    # The round sends the request once (a vendor refuses a file with a repeated custom_id)...
    assert [json.loads(line)["custom_id"] for line in sent] == ["retry-x"]
    # ... and the failed row was sent twice in all.
    assert rows[1]["attempts"] == 2
    assert [b["request_counts"]["total"] for r in manifest["rounds"] for b in r["batches"]] == [1]


# -- joined request files the vendor serves (no input_file) --------------------------------------------


SHAPES = {
    "no-final-newline": lambda ids: "\n".join(_line(i) for i in ids).encode(),
    "blank-lines": lambda ids: ("\n\n".join(_line(i) for i in ids) + "\n\n  \n").encode(),
    "crlf": lambda ids: "".join(_line(i) + "\r\n" for i in ids).encode(),
    "crlf-no-final-newline": lambda ids: "\r\n".join(_line(i) for i in ids).encode(),
    "bom": lambda ids: b"\xef\xbb\xbf" + "".join(_line(i) + "\n" for i in ids).encode(),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("shaped", [0, 1])
def test_joined_request_files_of_odd_shapes_land_every_row(
    connect: Any, moving: Clock, tmp_path: Path, shape: str, shaped: int
) -> None:
    emu = connect("openai")
    parts = [["a0", "retry-a1", "a2"], ["b0", "retry-b1"], ["c0"]]
    raw = [("".join(_line(i) + "\n" for i in p)).encode() for p in parts]
    raw[shaped] = SHAPES[shape](parts[shaped])
    ids, _ = _job(tmp_path, parts, raw=raw)
    _complete(emu, ids)

    manifest = _fetch(ids, tmp_path, None, resubmit_failed=1)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["custom_id"]: r["attempts"] for r in rows} == {
        i: 2 if i.startswith("retry-") else 1 for p in parts for i in p
    }
    # unknown_ids is left to the test below: a round's line replacing a part's is counted there.
    assert {k: v for k, v in manifest["anomalies"].items() if k != "unknown_ids"} == dict.fromkeys(
        ("duplicates", "no_custom_id", "malformed_lines", "duplicate_requests"), 0
    )
    assert manifest["counts"]["total"] == 6


@pytest.mark.parametrize("given_input", [True, False])
def test_a_rounds_line_replacing_a_parts_line_is_no_unknown_id(
    connect: Any, moving: Clock, tmp_path: Path, given_input: bool
) -> None:
    emu = connect("openai")
    parts = [["a0", "retry-a1"], ["retry-b0", "b1"]]
    ids, whole = _job(tmp_path, parts)
    _complete(emu, ids)

    manifest = _fetch(ids, tmp_path, whole if given_input else None, resubmit_failed=1)

    rows = _rows(manifest)
    assert [(r["custom_id"], r["status"], r["attempts"]) for r in rows] == [
        ("a0", "succeeded", 1),
        ("retry-a1", "succeeded", 2),
        ("retry-b0", "succeeded", 2),
        ("b1", "succeeded", 1),
    ]
    # Each line was for a request its batch was sent: the rounds' line replaces (README "Failed rows"),
    # the part's line is no stranger (JoinReport: unknown_ids are ids of no request the batch was sent).
    assert manifest["anomalies"]["unknown_ids"] == 0


def test_a_one_part_job_without_input_file_and_a_round(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("openai")
    parts = [["a0", "retry-a1", "fail-a2", "retry-a3"]]
    ids, _ = _job(tmp_path, parts)
    _complete(emu, ids)

    manifest = _fetch(ids, tmp_path, None, resubmit_failed=2)

    rows = _rows(manifest)
    assert [(r["custom_id"], r["status"], r["attempts"]) for r in rows] == [
        ("a0", "succeeded", 1),
        ("retry-a1", "succeeded", 2),
        ("fail-a2", "failed", 1),
        ("retry-a3", "succeeded", 2),
    ]
    assert len(manifest["rounds"]) == 1
    assert uploads_and_batches(emu, "openai") == (2, 2)


# -- where a part ends: llmbatch_requests ---------------------------------------------------------------


@pytest.mark.parametrize("recorded", ["3", "abc", "0", "", " 3", "３", "-3", "3.0"])
def test_part_ends_from_metadata_that_is_right_or_unreadable(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: str
) -> None:
    emu = connect("openai")
    parts = [["a0", "a1", "a2"], ["b0", "b1"], ["c0", "c1"]]
    ids, whole = _job(tmp_path, parts)
    # Part 1 failed (OpenAI reports 0 of 0), so its end can come only from metadata or its file.
    _complete(emu, ids, ["expired", "completed", "completed"])
    real = BatchHook.get_batch

    def get_batch(self: BatchHook, batch_id: str, **kwargs: Any) -> Batch:
        batch = real(self, batch_id, **kwargs)
        if batch_id != ids[0]:
            return batch
        counts = batch.request_counts.model_copy(update={"total": None, "completed": None, "failed": None})
        meta = {**(batch.metadata or {}), REQUESTS_METADATA: recorded}
        return batch.model_copy(update={"metadata": meta, "request_counts": counts})

    monkeypatch.setattr(BatchHook, "get_batch", get_batch)

    # The expired part's counts are unknown: the fetch judges the landed rows and fails after landing them.
    with pytest.raises(BatchOutcomeError):
        _fetch(ids, tmp_path, whole)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert [r["status"] for r in rows] == ["expired"] * 3 + ["succeeded"] * 4


def test_a_wrong_recorded_count_is_never_silent(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    parts = [["a0", "a1", "a2"], ["b0", "b1"]]
    ids, whole = _job(tmp_path, parts)
    _complete(emu, ids)
    real = BatchHook.get_batch

    def get_batch(self: BatchHook, batch_id: str, **kwargs: Any) -> Batch:
        batch = real(self, batch_id, **kwargs)
        if batch_id != ids[0]:
            return batch
        return batch.model_copy(update={"metadata": {**(batch.metadata or {}), REQUESTS_METADATA: "2"}})

    monkeypatch.setattr(BatchHook, "get_batch", get_batch)

    manifest = _fetch(ids, tmp_path, whole)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [i for p in parts for i in p]
    assert manifest["counts"]["total"] == 5
    assert manifest["anomalies"]["unknown_ids"] >= 1  # a2's line is in no part it is counted in


# -- rounds split into several batches --------------------------------------------------------------------


def _ds_retry_job(emu: Emulator, count: int = 150) -> dict[str, Any]:
    """A DashScope ds-test job of ``count`` rate-limited requests (100 a part); ended."""
    given = [{"custom_id": f"retry-{i}", "prompt": f"q {i}"} for i in range(count)]
    created = parts_op(requests=given).execute(make_context(FakeTI(), FakeStateStore()))
    emu.advance_clock(10_000)
    assert {emu.batch("dashscope", b)["status"] for b in created["batch_ids"]} == {"completed"}
    return created


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(
    ("op", "die_on", "after"),
    [
        ("create_batch", 1, True),
        ("create_batch", 2, False),
        ("upload_file", 2, True),
        ("create_batch", 2, True),
    ],
)
def test_a_retry_between_a_rounds_parts_creates_each_round_part_once(
    connect: Any,
    moving: Clock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store: str,
    op: str,
    die_on: int,
    after: bool,
) -> None:
    emu = connect("dashscope")
    created = _ds_retry_job(emu)
    assert uploads_and_batches(emu, "dashscope") == (2, 2)
    state = state_store(store)
    real = getattr(BatchHook, op)

    die_on_call(monkeypatch, op, die_on, after=after)
    with pytest.raises(RuntimeError, match="worker died"):
        _fetch(created["batch_ids"], tmp_path, created["input_uri"], state, resubmit_failed=1)
    monkeypatch.setattr(BatchHook, op, real)

    manifest = _fetch(created["batch_ids"], tmp_path, created["input_uri"], state, resubmit_failed=1)

    # Two job parts, two round parts (150 rows, 100 a file): each uploaded and created once.
    assert uploads_and_batches(emu, "dashscope") == (4, 4)
    [round_] = manifest["rounds"]
    assert [b["request_counts"]["total"] for b in round_["batches"]] == [100, 50]
    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [f"retry-{i}" for i in range(150)]
    # One round, however many batches: one more attempt each.
    assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 2)}
    again = _fetch(created["batch_ids"], tmp_path, created["input_uri"], state, resubmit_failed=1)
    assert again["rounds"] == manifest["rounds"]
    assert uploads_and_batches(emu, "dashscope") == (4, 4)


def test_one_round_part_expired_is_sent_again_by_the_next_round_only(
    connect: Any, moving: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("dashscope")
    created = _ds_retry_job(emu)
    real = BatchHook.create_batch
    calls = {"n": 0}

    def second_round_part_expires(self: BatchHook, **kwargs: Any) -> Any:
        batch = real(self, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            emu.force_status("dashscope", batch.id, "expired")
        return batch

    monkeypatch.setattr(BatchHook, "create_batch", second_round_part_expires)

    manifest = _fetch(created["batch_ids"], tmp_path, created["input_uri"], resubmit_failed=2)

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [f"retry-{i}" for i in range(150)]
    assert {r["status"] for r in rows} == {"succeeded"}
    attempts = [r["attempts"] for r in rows]
    assert attempts == [2] * 100 + [3] * 50
    assert [[b["status"] for b in r["batches"]] for r in manifest["rounds"]] == [
        ["completed", "expired"],
        ["completed"],
    ]
    sent = (tmp_path / "results.round-2.requests.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in sent] == [f"retry-{i}" for i in range(100, 150)]
    assert uploads_and_batches(emu, "dashscope") == (5, 5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("include_request", [True, False])
def test_a_split_round_with_include_request_and_parquet(
    connect: Any, moving: Clock, tmp_path: Path, fmt: str, include_request: bool
) -> None:
    emu = connect("dashscope")
    created = _ds_retry_job(emu, 130)

    try:
        manifest = _fetch(
            created["batch_ids"],
            tmp_path,
            created["input_uri"],
            resubmit_failed=1,
            format=fmt,
            include_request=include_request,
            destination=str(tmp_path / f"results.{fmt}"),
        )
    finally:
        gc.collect()  # a Parquet writer left open by a failed join is collected here, not in a later test

    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(manifest["result_uri"].removeprefix("file://")).to_pylist()
    else:
        rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == [f"retry-{i}" for i in range(130)]
    assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 2)}
    if include_request:
        bodies = [r["request"] for r in rows]
        if fmt == "parquet" and isinstance(bodies[0], str):
            bodies = [json.loads(b) for b in bodies]
        assert all(f"q {i}" in json.dumps(b) for i, b in enumerate(bodies))
    else:
        assert all("request" not in r or r["request"] is None for r in rows)
    assert (tmp_path / "results.round-1.requests.jsonl").exists()
    assert [b["request_counts"]["total"] for b in manifest["rounds"][0]["batches"]] == [100, 30]
    assert uploads_and_batches(emu, "dashscope") == (4, 4)


def test_a_rounds_line_for_a_request_it_was_not_sent_never_lands(
    connect: Any, moving: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    parts = [["a0", "retry-a1"], ["b0", "b1"]]
    ids, whole = _job(tmp_path, parts)
    _complete(emu, ids)

    def stray_in_round(name: str, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not name.startswith("1-"):
            return lines
        # The round's output holds a line for b0, which the round was not sent.
        stray = _say(lines[0], "STRAY")
        stray["custom_id"] = "b0"
        return [*lines, stray]

    _mark_lines(monkeypatch, stray_in_round)

    manifest = _fetch(ids, tmp_path, whole, resubmit_failed=1)

    rows = {r["custom_id"]: r for r in _rows(manifest)}
    assert rows["retry-a1"]["attempts"] == 2
    assert rows["b0"]["attempts"] == 1
    # README: a line is never landed on a request it was not sent for; it counts under unknown_ids.
    assert "STRAY" not in json.dumps(rows["b0"])
    assert manifest["anomalies"]["unknown_ids"] == 1


# -- the file quota of a retry whose upload was deleted --------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(("held", "fits"), [(9997, True), (9998, False)])
def test_a_retry_whose_unbatched_upload_was_deleted_counts_it_as_needed(
    connect: Any, monkeypatch: pytest.MonkeyPatch, store: str, held: int, fits: bool
) -> None:
    emu = connect("dashscope")
    state = state_store(store)
    # Try 1: part 1 uploaded and created, part 2 uploaded, then the worker dies before its create.
    real = BatchHook.create_batch
    die_on_call(monkeypatch, "create_batch", 2, after=False)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    monkeypatch.setattr(BatchHook, "create_batch", real)
    assert uploads_and_batches(emu, "dashscope") == (2, 1)
    # Part 2's upload (the newest file) is deleted, by hand or a cleanup: the retry must upload it again.
    newest = emu.files("dashscope")[0]["id"]
    with BatchHook(CONN_ID) as hook:
        hook.delete_file(newest)
    hold_files(emu, "dashscope", held)

    if fits:
        result = parts_op().execute(make_context(FakeTI(), state))
        assert len(result["batch_ids"]) == 3
        assert uploads_and_batches(emu, "dashscope") == (4, 3)
        return
    with pytest.raises(InvalidInputError, match=r"holds 9999 and this job needs 2 more \(1 uploaded"):
        parts_op().execute(make_context(FakeTI(), state))
    assert uploads_and_batches(emu, "dashscope") == (2, 1)


@pytest.mark.parametrize(
    ("vendor", "code", "retry"),
    [
        ("dashscope", "Throttling", True),
        ("dashscope", "Throttling.", True),
        ("dashscope", "InternalError.Algo.Sub", True),
        ("dashscope", "ThrottlingX", False),
        ("dashscope", "throttling.user", False),
        ("dashscope", "InternalErrorTimeout", False),
        ("moonshot", "rate_limit_reached_error.x", False),
        ("zhipu", "13020", False),
    ],
)
def test_code_families_match_by_prefix_only_on_dashscope(vendor: str, code: str, retry: bool) -> None:
    from airflow_provider_llmbatch.resubmit import worth_resubmitting

    row = {"status": "failed", "error": {"code": code, "message": "m"}}
    assert worth_resubmitting(row, REGISTRY[vendor]) is retry
