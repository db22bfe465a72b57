"""
Variations on "Large jobs" and "Failed rows": split, quotas, per-part retry safety,
resubmission rounds, delete_input_file and the cleanup.

Every test talks to the slow emulator (batches stay put until the test moves the clock or forces a
status) and counts what the emulator stored: uploads, batches, files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.faults import FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.operators.cleanup import CleanupRemoteFilesOperator
from airflow_provider_llmbatch.operators.reattach import KEY_METADATA, batch_key
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.resubmit import retryable_ids, worth_resubmitting
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    DS_TEST,
    DS_TEST_MODEL,
    STORES,
    FakeStateStore,
    FakeTI,
    create_op,
    die_on_call,
    hold_files,
    make_context,
    parts_op,
    records,
    state_store,
    uploads_and_batches,
    write_requests,
)
from tests.pollkit import Clock

MIB = 1024**2
DAY = 86_400.0


# -- helpers ------------------------------------------------------------------------------------------


def _ds_records(ids: list[str]) -> list[dict[str, Any]]:
    return [{"custom_id": i, "prompt": f"question {i}"} for i in ids]


def _ids_in(emu: Emulator, vendor: str, file_id: str) -> list[str]:
    lines = emu.file_path(vendor, file_id).read_text().splitlines()
    return [json.loads(line)["custom_id"] for line in lines]


def _by_id(emu: Emulator, vendor: str) -> dict[str, dict[str, Any]]:
    return {b["id"]: b for b in emu.batches(vendor)}


def _fetch_op(
    batch_ids: list[str], input_uri: str, tmp_path: Path, **kwargs: Any
) -> FetchBatchResultsOperator:
    return FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=batch_ids,
        input_file=input_uri,
        destination=str(tmp_path / "results.jsonl"),
        deferrable=False,
        poll_interval=60,
        **kwargs,
    )


def _rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    text = Path(manifest["result_uri"].removeprefix("file://")).read_text()
    return [json.loads(line) for line in text.splitlines()]


# -- split: count limit, byte limit, per-line limit, max_batches ---------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [(100, [100]), (101, [100, 1]), (200, [100, 100]), (201, [100, 100, 1])],
)
def test_count_limit_boundaries_split_exactly(connect: Any, count: int, expected: list[int]) -> None:
    emu = connect("dashscope")
    ti = FakeTI()
    result = parts_op(count).execute(make_context(ti, FakeStateStore()))

    assert result["request_counts"] == expected
    assert len(result["batch_ids"]) == len(expected) == len(ti.xcom("batch_ids"))
    assert result["batch_id"] == result["batch_ids"][0] == ti.xcom("batch_id")
    assert uploads_and_batches(emu, "dashscope") == (len(expected), len(expected))
    by_id = _by_id(emu, "dashscope")
    sent = [_ids_in(emu, "dashscope", by_id[b]["input_file_id"]) for b in result["batch_ids"]]
    assert [i for part in sent for i in part] == [f"r{i}" for i in range(count)]
    context = make_context(ti)
    keys = [by_id[b]["metadata"][KEY_METADATA] for b in result["batch_ids"]]
    if len(expected) == 1:
        # A one-part job keeps the key it always had (no part index in it).
        assert keys == [batch_key(context, result["input_fingerprint"])]
    else:
        assert keys == [batch_key(context, result["input_fingerprint"], i) for i in range(len(expected))]


def _sized_line(custom_id: str, size: int, newline: str = "\n") -> str:
    """A ds-test request line of exactly ``size`` bytes once sent (with a plain ``\\n``)."""

    def line(pad: str) -> str:
        return json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": DS_TEST,
                "body": {"model": DS_TEST_MODEL, "messages": [{"role": "user", "content": pad}]},
            }
        )

    base = len(line("").encode()) + 1
    text = line("x" * (size - base))
    assert len(text.encode()) + 1 == size
    return text + newline


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize(("lines", "expected"), [(8, [4, 4]), (9, [4, 4, 1])])
def test_byte_limit_splits_fill_each_part_to_exactly_the_limit(
    connect: Any, tmp_path: Path, newline: str, lines: int, expected: list[int]
) -> None:
    emu = connect("dashscope")
    # Four lines of a quarter MiB fill the test endpoint's 1 MiB file exactly; the count limit (100) is far.
    path = tmp_path / "big.jsonl"
    path.write_bytes("".join(_sized_line(f"b{i}", MIB // 4, newline) for i in range(lines)).encode())

    result = parts_op(requests=None, input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))

    assert result["request_counts"] == expected
    files = {f["id"]: f for f in emu.files("dashscope")}
    sizes = [files[i]["bytes"] for i in result["input_file_ids"]]
    assert sizes == [n * (MIB // 4) for n in expected]
    assert all(size <= MIB for size in sizes)
    by_id = _by_id(emu, "dashscope")
    sent = [_ids_in(emu, "dashscope", by_id[b]["input_file_id"]) for b in result["batch_ids"]]
    assert [i for part in sent for i in part] == [f"b{i}" for i in range(lines)]
    assert uploads_and_batches(emu, "dashscope") == (len(expected), len(expected))


def test_a_line_over_the_endpoints_file_limit_is_refused_before_any_request(
    connect: Any, tmp_path: Path
) -> None:
    emu = connect("dashscope")
    # The test endpoint takes 1 MiB a file: a line above that can be in no part (the vendor's 6 MiB per
    # line is not the limit that binds here). Per-line limits stay errors, found before any request.
    path = tmp_path / "one-big-line.jsonl"
    path.write_text(_sized_line("small", 1000) + _sized_line("huge", MIB + 100))

    with pytest.raises(InvalidInputError, match="line 2"):
        parts_op(requests=None, input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))

    assert emu.stats("dashscope")["operations"] == {}


@pytest.mark.parametrize(
    ("count", "max_batches", "ok"),
    [
        (1000, None, True),
        (1001, None, False),
        (100, 1, True),
        (101, 1, False),
        (300, 3, True),
        (301, 3, False),
    ],
)
def test_max_batches_boundaries(connect: Any, count: int, max_batches: int | None, ok: bool) -> None:
    emu = connect("dashscope")
    kwargs = {} if max_batches is None else {"max_batches": max_batches}
    op = parts_op(count, **kwargs)
    parts = math.ceil(count / 100)
    if not ok:
        limit = 10 if max_batches is None else max_batches
        with pytest.raises(InvalidInputError, match=rf"needs {parts} batches .*max_batches={limit}\b"):
            op.execute(make_context(FakeTI(), FakeStateStore()))
        assert emu.stats("dashscope")["operations"] == {}
        return
    result = op.execute(make_context(FakeTI(), FakeStateStore()))
    assert len(result["batch_ids"]) == parts
    assert uploads_and_batches(emu, "dashscope") == (parts, parts)


# -- quotas before upload -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moonshot_three_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moonshot") / "requests.jsonl"
    build_request_file(records(100_001), path, REGISTRY["moonshot"], model="kimi", whole_input=True)
    return path


@pytest.mark.parametrize(("held", "fits"), [(997, True), (998, False), (1000, False)])
def test_moonshot_quota_boundary(connect: Any, moonshot_three_parts: Path, held: int, fits: bool) -> None:
    emu = connect("moonshot")
    hold_files(emu, "moonshot", held)
    ti = FakeTI()
    op = create_op(input_file=str(moonshot_three_parts))
    if fits:
        result = op.execute(make_context(ti, FakeStateStore()))
        assert result["request_counts"] == [50_000, 50_000, 1]
        assert uploads_and_batches(emu, "moonshot") == (3, 3)
        assert emu.stats("moonshot")["files"] == 1000
        return
    with pytest.raises(InvalidInputError, match="at most 1000 batch files per account") as info:
        op.execute(make_context(ti, FakeStateStore()))
    message = str(info.value)
    assert f"holds {held} and this job needs 3 more" in message
    assert "CleanupRemoteFilesOperator" in message
    assert "upload" not in emu.stats("moonshot")["operations"]
    assert ti.pushed == []


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize(("held", "fits"), [(9997, True), (9998, False), (10_000, False)])
def test_dashscope_quota_near_ten_thousand(connect: Any, store: str, held: int, fits: bool) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", held)
    ti = FakeTI()
    if fits:
        result = parts_op().execute(make_context(ti, state_store(store)))
        assert len(result["batch_ids"]) == 3
        assert uploads_and_batches(emu, "dashscope") == (3, 3)
        return
    # With or without a task state store (Airflow before 3.3 has none), a first try counts the files.
    with pytest.raises(InvalidInputError, match="at most 10000 batch files per account") as info:
        parts_op().execute(make_context(ti, state_store(store)))
    assert f"holds {held} and this job needs 3 more" in str(info.value)
    stats = emu.stats("dashscope")
    assert "upload" not in stats["operations"]
    assert "create" not in stats["operations"]
    assert (stats["files_uploaded"], stats["batches"]) == (0, 0)


def test_output_files_do_not_count_against_the_batch_file_quota(connect: Any) -> None:
    emu = connect("dashscope")
    # Results the vendor wrote (purpose batch_output) are not request files: the job fits.
    hold_files(emu, "dashscope", 9998, purpose="batch_output", kind="output")
    result = parts_op().execute(make_context(FakeTI(), FakeStateStore()))
    assert len(result["batch_ids"]) == 3
    assert uploads_and_batches(emu, "dashscope") == (3, 3)


def test_the_quota_count_reads_the_vendors_largest_pages(connect: Any) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", 9997)
    parts_op().execute(make_context(FakeTI(), FakeStateStore()))
    # DashScope lists up to 2,000 files a page: counting 10,000 takes a handful of calls, not hundreds.
    assert emu.stats("dashscope")["operations"].get("list_files", 0) <= 10


def _zhipu_embeddings_op(count: int = 20_001, **kwargs: Any) -> Any:
    given = [{"custom_id": f"e{i}", "input": f"text {i}"} for i in range(count)]
    return create_op(requests=given, model="embedding-3", endpoint="/v4/embeddings", **kwargs)


@pytest.mark.parametrize(("held", "fits"), [(997, True), (998, False)])
def test_zhipu_quota_on_a_three_part_embeddings_job(connect: Any, held: int, fits: bool) -> None:
    emu = connect("zhipu")
    hold_files(emu, "zhipu", held)
    if fits:
        result = _zhipu_embeddings_op().execute(make_context(FakeTI(), FakeStateStore()))
        assert result["request_counts"] == [10_000, 10_000, 1]
        assert uploads_and_batches(emu, "zhipu") == (3, 3)
        return
    with pytest.raises(InvalidInputError, match="holds 998 and this job needs 3 more"):
        _zhipu_embeddings_op().execute(make_context(FakeTI(), FakeStateStore()))
    assert "upload" not in emu.stats("zhipu")["operations"]


# -- per-part retry safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_kill_after_part_ks_upload_before_its_create(
    connect: Any, monkeypatch: pytest.MonkeyPatch, k: int, store: str
) -> None:
    emu = connect("dashscope")
    state = state_store(store)
    real_create = BatchHook.create_batch
    die_on_call(monkeypatch, "create_batch", k, after=False)
    with pytest.raises(RuntimeError, match="worker died before create_batch"):
        parts_op().execute(make_context(FakeTI(), state))
    monkeypatch.setattr(BatchHook, "create_batch", real_create)
    assert uploads_and_batches(emu, "dashscope") == (k, k - 1)
    uploaded = [f["id"] for f in reversed(emu.files("dashscope"))]  # oldest first
    earlier = [b["id"] for b in reversed(emu.batches("dashscope"))]

    result = parts_op().execute(make_context(FakeTI(), state))

    assert uploads_and_batches(emu, "dashscope") == (3, 3)
    assert emu.stats("dashscope")["batches"] == 3
    assert result["batch_ids"][: k - 1] == earlier
    assert result["input_file_ids"][:k] == uploaded  # part k's upload reused, not sent again
    by_id = _by_id(emu, "dashscope")
    sent = [_ids_in(emu, "dashscope", by_id[b]["input_file_id"]) for b in result["batch_ids"]]
    assert [i for part in sent for i in part] == [f"r{i}" for i in range(250)]


@pytest.mark.parametrize("store", ["state_store", "no_store"])
@pytest.mark.parametrize("k", [4, 5])
def test_five_parts_killed_after_part_ks_create(
    connect: Any, monkeypatch: pytest.MonkeyPatch, k: int, store: str
) -> None:
    emu = connect("dashscope")
    state = state_store(store)
    real_create = BatchHook.create_batch
    die_on_call(monkeypatch, "create_batch", k, after=True)
    with pytest.raises(RuntimeError, match="worker died after create_batch"):
        parts_op(450).execute(make_context(FakeTI(), state))
    monkeypatch.setattr(BatchHook, "create_batch", real_create)
    earlier = [b["id"] for b in reversed(emu.batches("dashscope"))]
    assert len(earlier) == k

    ti = FakeTI()
    result = parts_op(450).execute(make_context(ti, state))

    assert uploads_and_batches(emu, "dashscope") == (5, 5)
    assert result["request_counts"] == [100, 100, 100, 100, 50]
    assert result["batch_ids"][:k] == earlier
    assert result["reattached"] is (k == 5)
    assert ti.xcom("batch_ids") == result["batch_ids"]


@pytest.mark.parametrize("store", STORES)
def test_two_retries_in_a_row_create_each_part_once(
    connect: Any, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("dashscope")
    state = state_store(store)
    real_create = BatchHook.create_batch

    # Try 1: dies right after part 1's create.
    die_on_call(monkeypatch, "create_batch", 1, after=True)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    assert uploads_and_batches(emu, "dashscope") == (1, 1)
    # Try 2: re-attaches part 1, uploads part 2 and dies before its create.
    die_on_call(monkeypatch, "create_batch", 1, after=False)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    assert uploads_and_batches(emu, "dashscope") == (2, 1)
    monkeypatch.setattr(BatchHook, "create_batch", real_create)

    # Try 3 finishes the job; try 4 (a cleared task) only re-attaches.
    third = parts_op().execute(make_context(FakeTI(), state))
    assert uploads_and_batches(emu, "dashscope") == (3, 3)
    fourth = parts_op().execute(make_context(FakeTI(), state))
    assert fourth["reattached"] is True
    assert fourth["batch_ids"] == third["batch_ids"]
    assert uploads_and_batches(emu, "dashscope") == (3, 3)


def test_a_lost_create_answer_of_a_middle_part_is_found_not_repeated(
    connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("dashscope")
    real_create = BatchHook.create_batch
    calls = {"n": 0}

    def second_answer_lost(self: BatchHook, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            emu.add_fault(FaultRule("reset_after", vendor="dashscope", operation="create", times=1))
        return real_create(self, **kwargs)

    monkeypatch.setattr(BatchHook, "create_batch", second_answer_lost)
    result = parts_op().execute(make_context(FakeTI(), FakeStateStore()))
    emu.clear_faults()

    assert len(set(result["batch_ids"])) == 3
    assert uploads_and_batches(emu, "dashscope") == (3, 3)


def test_a_lost_upload_answer_of_a_middle_part_is_found_not_repeated(
    connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("dashscope")
    real_upload = BatchHook.upload_file
    calls = {"n": 0}

    def second_answer_lost(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            emu.add_fault(FaultRule("reset_after", vendor="dashscope", operation="upload", times=1))
        return real_upload(self, *args, **kwargs)

    monkeypatch.setattr(BatchHook, "upload_file", second_answer_lost)
    result = parts_op().execute(make_context(FakeTI(), FakeStateStore()))
    emu.clear_faults()

    assert len(set(result["input_file_ids"])) == 3
    assert uploads_and_batches(emu, "dashscope") == (3, 3)


@pytest.mark.parametrize("store", ["state_store", "no_store"])
def test_zhipu_embeddings_parts_killed_after_part_two(
    connect: Any, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("zhipu")
    state = state_store(store)
    real_create = BatchHook.create_batch
    die_on_call(monkeypatch, "create_batch", 2, after=True)
    with pytest.raises(RuntimeError, match="worker died"):
        _zhipu_embeddings_op().execute(make_context(FakeTI(), state))
    monkeypatch.setattr(BatchHook, "create_batch", real_create)

    result = _zhipu_embeddings_op().execute(make_context(FakeTI(), state))

    assert result["request_counts"] == [10_000, 10_000, 1]
    assert uploads_and_batches(emu, "zhipu") == (3, 3)


# -- fetch: merged parts, rounds ------------------------------------------------------------------------

MIXED = [f"r{i}" for i in range(250)]
for _pos, _name in ((0, "retry-0"), (5, "fail-5"), (150, "retry-150"), (160, "fail-160"), (249, "retry-249")):
    MIXED[_pos] = _name


def _ended_parts(emu: Emulator, ids: list[str]) -> dict[str, Any]:
    created = parts_op(requests=_ds_records(ids)).execute(make_context(FakeTI(), FakeStateStore()))
    emu.advance_clock(10_000)
    assert {emu.batch("dashscope", b)["status"] for b in created["batch_ids"]} == {"completed"}
    return created


def test_a_split_job_lands_one_file_in_input_order(connect: Any, moving: Clock, tmp_path: Path) -> None:
    emu = connect("dashscope")
    created = _ended_parts(emu, MIXED)

    manifest = _fetch_op(created["batch_ids"], created["input_uri"], tmp_path).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == MIXED
    failed = {r["custom_id"] for r in rows if r["status"] == "failed"}
    assert failed == {"retry-0", "fail-5", "retry-150", "fail-160", "retry-249"}
    assert {r["attempts"] for r in rows} == {1}
    assert [p["batch_id"] for p in manifest["parts"]] == created["batch_ids"]
    assert [p["request_counts"]["total"] for p in manifest["parts"]] == [100, 100, 50]
    assert manifest["counts"]["total"] == 250
    assert manifest["rounds"] == []


def test_a_split_job_on_the_test_endpoint_resubmits_its_retryable_rows(
    connect: Any, moving: Clock, tmp_path: Path
) -> None:
    emu = connect("dashscope")
    created = _ended_parts(emu, MIXED)

    manifest = _fetch_op(created["batch_ids"], created["input_uri"], tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == MIXED
    by = {r["custom_id"]: r for r in rows}
    assert {i: by[i]["attempts"] for i in ("retry-0", "retry-150", "retry-249")} == dict.fromkeys(
        ("retry-0", "retry-150", "retry-249"), 2
    )
    assert {r["custom_id"] for r in rows if r["status"] != "succeeded"} == {"fail-5", "fail-160"}
    sent = (tmp_path / "results.round-1.requests.jsonl").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in sent] == ["retry-0", "retry-150", "retry-249"]
    assert len(manifest["rounds"]) == 1
    assert uploads_and_batches(emu, "dashscope") == (4, 4)


def test_every_row_of_a_split_job_failing_retryably_is_resubmitted_within_file_limits(
    connect: Any, moving: Clock, tmp_path: Path
) -> None:
    emu = connect("moonshot")
    # 50,001 requests: two parts; every one rate limited once. The round holds more than one file may.
    ids = [f"retry-{i}" for i in range(50_001)]
    path = tmp_path / "requests.jsonl"
    build_request_file(_ds_records(ids), path, REGISTRY["moonshot"], model="kimi", whole_input=True)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))
    assert created["request_counts"] == [50_000, 1]
    emu.advance_clock(10_000)

    manifest = _fetch_op(created["batch_ids"], created["input_uri"], tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    assert manifest["counts"]["succeeded"] == 50_001
    assert len(manifest["rounds"]) == 1
    assert sum(len(r["batches"]) for r in manifest["rounds"]) >= 2  # no file over the vendor's limit


@pytest.mark.parametrize("vendor", ["zhipu", "moonshot", "dashscope", "openai"])
def test_every_row_failing_retryably_is_mended_in_one_round(
    connect: Any, moving: Clock, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    ids = [f"retry-{i}" for i in range(6)]
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI()))
    emu.advance_clock(10_000)

    manifest = _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=3).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ids
    assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 2)}
    assert len(manifest["rounds"]) == 1
    assert manifest["rounds"][0]["batches"][0]["request_counts"]["total"] == 6
    assert uploads_and_batches(emu, vendor) == (2, 2)


NON_RETRYABLE_COMMON = ["invalid_request", "content_filter", "context_length_exceeded", "invalid_output"]
NON_RETRYABLE_BY_VENDOR = {
    "zhipu": ["1301", "1214", "1113", "1112", "1211"],
    "moonshot": ["invalid_request_error", "exceeded_current_quota_error", "content_filter"],
    "dashscope": ["InvalidParameter", "DataInspectionFailed", "Arrearage"],
    "openai": ["invalid_request_error", "insufficient_quota"],
}


@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_a_mix_of_codes_per_vendor_resubmits_exactly_the_transient_ones(tmp_path: Path, vendor: str) -> None:
    spec = REGISTRY[vendor]
    others = set().union(*(s.errors.retryable_codes for s in REGISTRY.values())) - spec.errors.retryable_codes
    rows: list[tuple[dict[str, Any], bool]] = []
    for code in [*sorted(spec.errors.retryable_codes), "batch_expired", "batch_cancelled"]:
        rows.append(({"status": "failed", "error": {"code": code, "message": "m"}}, True))
    rows.append(({"status": "expired", "error": {"code": "batch_expired", "message": "m"}}, True))
    rows.append(({"status": "cancelled", "error": {"code": "batch_cancelled", "message": "m"}}, True))
    for code in NON_RETRYABLE_COMMON + NON_RETRYABLE_BY_VENDOR[vendor] + sorted(others):
        rows.append(({"status": "failed", "error": {"code": code, "message": "m"}}, False))
    rows.append(({"status": "succeeded", "error": None}, False))
    rows.append(({"status": "missing", "error": {"code": "missing_result", "message": "m"}}, False))
    # Interleave so the order check means something.
    rows = rows[::2] + rows[1::2]
    results = tmp_path / "results.jsonl"
    with results.open("w") as handle:
        for n, (row, _) in enumerate(rows):
            handle.write(json.dumps({"custom_id": f"id-{n}", "response": None, "usage": {}, **row}) + "\n")

    expected = [f"id-{n}" for n, (_, retry) in enumerate(rows) if retry]
    assert list(retryable_ids(results, spec)) == expected


@pytest.mark.parametrize("code", ["InternalError.Timeout", "Throttling.User"])
def test_dashscope_code_families_from_the_readme_are_retryable(code: str) -> None:
    # README "Failed rows": DashScope `Throttling*`, `InternalError*` (families, by prefix).
    assert worth_resubmitting({"status": "failed", "error": {"code": code}}, REGISTRY["dashscope"])


@pytest.mark.parametrize("outcome", ["expired", "cancelled"])
@pytest.mark.parametrize("vendor", ["zhipu", "moonshot", "dashscope", "openai"])
def test_rows_of_a_batch_the_vendor_ended_early_are_resubmitted(
    connect: Any, moving: Clock, tmp_path: Path, vendor: str, outcome: str
) -> None:
    emu = connect(vendor)
    ids = [f"q{i}" for i in range(10)] + ["fail-x"]
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = create_op(input_file=str(path), metadata={"emulator_outcome": outcome}).execute(
        make_context(FakeTI())
    )
    emu.advance_clock(10_000)
    assert emu.batch(vendor, created["batch_id"])["status"] == outcome

    manifest = _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = _rows(manifest)
    assert [r["custom_id"] for r in rows] == ids
    unrun = [r for r in rows if r["attempts"] == 2]
    assert unrun, "the rows that never ran were not sent again"
    assert {r["status"] for r in rows if r["custom_id"] != "fail-x"} == {"succeeded"}
    assert next(r for r in rows if r["custom_id"] == "fail-x")["status"] in ("failed", "succeeded")
    assert uploads_and_batches(emu, vendor) == (2, 2)


def _expire_new_batches(emu: Emulator, vendor: str, monkeypatch: pytest.MonkeyPatch, first: int = 1) -> None:
    """From the ``first``-th create on, the vendor expires each new batch at once (nothing ran)."""
    real = BatchHook.create_batch
    calls = {"n": 0}

    def create_then_expire(self: BatchHook, **kwargs: Any) -> Any:
        batch = real(self, **kwargs)
        calls["n"] += 1
        if calls["n"] >= first:
            emu.force_status(vendor, batch.id, "expired")
        return batch

    monkeypatch.setattr(BatchHook, "create_batch", create_then_expire)


@pytest.mark.parametrize("vendor", ["moonshot", "zhipu"])
def test_two_rounds_when_the_first_round_expired(
    connect: Any, moving: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    ids = ["a", "retry-b", "fail-c", "retry-d"]
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI()))
    emu.advance_clock(10_000)
    real = BatchHook.create_batch
    calls = {"n": 0}

    def first_round_expires(self: BatchHook, **kwargs: Any) -> Any:
        batch = real(self, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            emu.force_status(vendor, batch.id, "expired")
        return batch

    monkeypatch.setattr(BatchHook, "create_batch", first_round_expires)

    manifest = _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=2).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    by = {r["custom_id"]: r for r in _rows(manifest)}
    assert {i: (by[i]["status"], by[i]["attempts"]) for i in ids} == {
        "a": ("succeeded", 1),
        "retry-b": ("succeeded", 3),
        "fail-c": ("failed", 1),
        "retry-d": ("succeeded", 3),
    }
    assert [r["batches"][0]["status"] for r in manifest["rounds"]] == ["expired", "completed"]
    assert uploads_and_batches(emu, vendor) == (3, 3)


@pytest.mark.parametrize("store", STORES)
def test_a_round_the_vendor_expired_is_not_created_again_by_a_retry(
    connect: Any, moving: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: str
) -> None:
    emu = connect("moonshot")
    ids = ["a", "retry-b", "fail-c"]
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY["moonshot"], ids)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI()))
    emu.advance_clock(10_000)
    _expire_new_batches(emu, "moonshot", monkeypatch)
    state = state_store(store)

    # Try 1: the round is created (and the vendor expires it); the worker dies while landing.
    with pytest.raises(RuntimeError, match="worker died"):
        _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=1).execute(
            make_context(FakeTI(task_id="fetch", fail_on={"result_uri"}), state)
        )
    assert uploads_and_batches(emu, "moonshot") == (2, 2)

    manifest = _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=1).execute(
        make_context(FakeTI(task_id="fetch"), state)
    )

    # Round 1 exists already (it ended): a retry re-attaches to it, it does not pay for another.
    assert uploads_and_batches(emu, "moonshot") == (2, 2)
    assert len(manifest["rounds"]) == 1


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("vendor", ["moonshot", "openai", "zhipu"])
def test_two_deaths_in_a_row_around_a_round(
    connect: Any, moving: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, vendor: str, store: str
) -> None:
    emu = connect(vendor)
    ids = ["a", "retry-b", "fail-c", "retry-d", "e"]
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = create_op(input_file=str(path)).execute(make_context(FakeTI()))
    emu.advance_clock(10_000)
    state = state_store(store)
    real_upload, real_create = BatchHook.upload_file, BatchHook.create_batch

    def fetch() -> dict[str, Any]:
        return _fetch_op(created["batch_ids"], str(path), tmp_path, resubmit_failed=1).execute(
            make_context(FakeTI(task_id="fetch"), state)
        )

    # Try 1: the round's file is stored, then the worker dies.
    die_on_call(monkeypatch, "upload_file", 1, after=True)
    with pytest.raises(RuntimeError, match="worker died"):
        fetch()
    monkeypatch.setattr(BatchHook, "upload_file", real_upload)
    assert uploads_and_batches(emu, vendor) == (2, 1)
    # Try 2: reuses the upload, dies between it and the round's create.
    die_on_call(monkeypatch, "create_batch", 1, after=False)
    with pytest.raises(RuntimeError, match="worker died"):
        fetch()
    monkeypatch.setattr(BatchHook, "create_batch", real_create)
    assert uploads_and_batches(emu, vendor) == (2, 1)
    # Try 3 lands; try 4 (cleared) creates nothing.
    manifest = fetch()
    assert uploads_and_batches(emu, vendor) == (2, 2)
    again = fetch()
    assert again["rounds"] == manifest["rounds"]
    assert uploads_and_batches(emu, vendor) == (2, 2)
    by = {r["custom_id"]: r for r in _rows(again)}
    assert {i: by[i]["attempts"] for i in ids} == {"a": 1, "retry-b": 2, "fail-c": 1, "retry-d": 2, "e": 1}


# -- delete_input_file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("delete", [True, False])
def test_delete_input_file_removes_each_parts_request_file_only(
    connect: Any, moving: Clock, tmp_path: Path, delete: bool
) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", 2)  # someone else's files
    created = _ended_parts(emu, [f"r{i}" for i in range(249)] + ["fail-x"])
    before = {f["id"] for f in emu.files("dashscope")}

    kwargs = {"delete_input_file": True} if delete else {}
    _fetch_op(created["batch_ids"], created["input_uri"], tmp_path, **kwargs).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    after = {f["id"] for f in emu.files("dashscope")}
    inputs = set(created["input_file_ids"])
    assert after == (before - inputs if delete else before)
    for batch_id in created["batch_ids"]:  # output and error files stay
        batch = emu.batch("dashscope", batch_id)
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                assert batch[key] in after


def test_delete_input_file_removes_the_rounds_request_file_too(
    connect: Any, moving: Clock, tmp_path: Path
) -> None:
    emu = connect("zhipu")
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY["zhipu"], ["a", "retry-b"])
    created = create_op(input_file=str(path), vendor_options={"auto_delete_input_file": False}).execute(
        make_context(FakeTI())
    )
    emu.advance_clock(10_000)

    manifest = _fetch_op(
        created["batch_ids"], str(path), tmp_path, resubmit_failed=1, delete_input_file=True
    ).execute(make_context(FakeTI(task_id="fetch")))

    round_batch = emu.batch("zhipu", manifest["rounds"][0]["batches"][0]["batch_id"])
    remaining = {f["id"] for f in emu.files("zhipu")}
    assert created["input_file_id"] not in remaining
    assert round_batch["input_file_id"] not in remaining
    assert {f["purpose"] for f in emu.files("zhipu")} <= {"batch_output"}


# -- cleanup ----------------------------------------------------------------------------------------------

KEY = "0123456789abcdef0123456789abcdef"
LOOKALIKES = [
    f"llmbatch-{KEY[:31]}.jsonl",
    f"llmbatch-{KEY}0.jsonl",
    f"llmbatch-{KEY.upper()}.jsonl",
    f"xllmbatch-{KEY}.jsonl",
    f"llmbatch-{KEY}.json",
    f"llmbatch-{KEY}.jsonl.gz",
    f"llmbatch_{KEY}.jsonl",
    f"dir/llmbatch-{KEY}.jsonl",
    f" llmbatch-{KEY}.jsonl",
    f"llmbatch-{KEY}.JSONL",
    "llmbatch-" + "g" * 32 + ".jsonl",
    f"llmbatch-{KEY[:16]}-{KEY[16:]}.jsonl",
    f"LLMBATCH-{KEY}.jsonl",
    f"copy of llmbatch-{KEY}.jsonl",
]


def _add(emu: Emulator, vendor: str, filename: str, age_days: float, **kwargs: Any) -> str:
    store = emu.runtime.store
    content = store.new_path(vendor, ".jsonl")
    content.write_text('{"custom_id": "a"}\n')
    kwargs.setdefault("purpose", "batch")
    kwargs.setdefault("kind", "input")
    created = store.clock() - age_days * DAY
    return str(store.add_file(vendor, content, filename=filename, created_at=created, **kwargs).id)


@pytest.mark.parametrize("vendor", ["zhipu", "moonshot", "dashscope", "openai"])
def test_cleanup_never_touches_lookalike_names(connect: Any, vendor: str) -> None:
    emu = connect(vendor)
    ours = [_add(emu, vendor, upload_name(f"{n:032x}"), 30) for n in range(2)]
    foreign = [_add(emu, vendor, name, 30) for name in LOOKALIKES]
    foreign.append(_add(emu, vendor, "b_output.jsonl", 30, purpose="batch_output", kind="output"))

    listed = CleanupRemoteFilesOperator(
        task_id="c", conn_id=CONN_ID, older_than_days=0, dry_run=True
    ).execute(make_context(FakeTI()))
    assert sorted(listed["file_ids"]) == sorted(ours)
    done = CleanupRemoteFilesOperator(task_id="c", conn_id=CONN_ID, older_than_days=0).execute(
        make_context(FakeTI())
    )
    assert sorted(done["file_ids"]) == sorted(ours)
    assert {f["id"] for f in emu.files(vendor)} == set(foreign)


def test_dry_run_deletes_nothing_however_often_it_runs(connect: Any) -> None:
    emu = connect("moonshot")
    ours = [_add(emu, "moonshot", upload_name(f"{n:032x}"), 10 + n) for n in range(4)]
    _add(emu, "moonshot", "theirs.jsonl", 40)
    everything = {f["id"] for f in emu.files("moonshot")}

    summaries = []
    for _ in range(3):
        summaries.append(
            CleanupRemoteFilesOperator(task_id="c", conn_id=CONN_ID, older_than_days=1, dry_run=True).execute(
                make_context(FakeTI())
            )
        )
        with BatchHook(CONN_ID) as hook:
            listed = hook.delete_uploaded_files(1, dry_run=True)
        assert sorted(f.id for f in listed.files) == sorted(ours)
    stats = emu.stats("moonshot")
    assert stats["files_deleted"] == 0
    assert stats["operations"].get("delete_file", 0) == 0
    assert {f["id"] for f in emu.files("moonshot")} == everything
    assert all(s["dry_run"] is True and sorted(s["file_ids"]) == sorted(ours) for s in summaries)

    done = CleanupRemoteFilesOperator(task_id="c", conn_id=CONN_ID, older_than_days=1).execute(
        make_context(FakeTI())
    )
    assert sorted(done["file_ids"]) == sorted(summaries[0]["file_ids"])
    assert done["dry_run"] is False


def test_cleanup_after_a_split_job_deletes_its_part_uploads_once_they_ended(connect: Any) -> None:
    emu = connect("dashscope")
    theirs = _add(emu, "dashscope", "theirs.jsonl", 30)
    created = parts_op().execute(make_context(FakeTI(), FakeStateStore()))
    inputs = set(created["input_file_ids"])

    with BatchHook(CONN_ID) as hook:
        kept = hook.delete_uploaded_files(0)
        assert kept.files == []
        assert set(kept.in_use) == inputs
        for batch_id in created["batch_ids"]:
            emu.force_status("dashscope", batch_id, "completed")
        dry = hook.delete_uploaded_files(0, dry_run=True)
        assert {f.id for f in dry.files} == inputs
        assert inputs <= {f["id"] for f in emu.files("dashscope")}
        gone = hook.delete_uploaded_files(0)

    assert {f.id for f in gone.files} == inputs
    remaining = {f["id"] for f in emu.files("dashscope")}
    assert not inputs & remaining
    assert theirs in remaining
    outputs = {emu.batch("dashscope", b)["output_file_id"] for b in created["batch_ids"]}
    assert outputs <= remaining
