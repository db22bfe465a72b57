"""
CreateBatchOperator with an input over the vendor's per-file limits: one batch per part, each retry-safe.

DashScope's test endpoint takes at most 100 requests a file, so 250 requests are three parts (100, 100,
50) without a large file; Moonshot has no small endpoint, and 100,001 requests make three parts of its
50,000. Everything that can refuse a job (the input, ``max_batches``, the vendor's file quota) does so
before the first upload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import BatchFailedError, InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.operators.reattach import KEY_METADATA, STATE_KEY, batch_key
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    DS_TEST,
    DS_TEST_MODEL,
    STORES,
    FakeStateStore,
    FakeTI,
    hold_files,
    make_context,
    parts_op,
    records,
    state_store,
)
from tests.operators.conftest import create_op as _op
from tests.pollkit import Clock, waits_on

PART_IDS = [[f"r{i}" for i in range(start, end)] for start, end in ((0, 100), (100, 200), (200, 250))]
"""The custom ids of the three parts of 250 requests on the test endpoint, in input order."""


def _part_ids(emu: Emulator, batch: dict[str, Any]) -> list[str]:
    """Return the custom ids of a batch's input file as the vendor stored it."""
    lines = emu.file_path("dashscope", batch["input_file_id"]).read_text().splitlines()
    return [json.loads(line)["custom_id"] for line in lines]


def _built_file(tmp_path: Path, count: int = 250) -> Path:
    """Write ``count`` requests for the test endpoint as a request file of its own."""
    path = tmp_path / "requests.jsonl"
    build_request_file(records(count), path, "dashscope", DS_TEST, model=DS_TEST_MODEL, whole_input=True)
    return path


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("given", ["requests", "input_file"])
def test_an_input_over_the_limit_becomes_one_batch_per_part(
    connect: Any, tmp_path: Path, given: str, store: str
) -> None:
    emu = connect("dashscope")
    ti = FakeTI()
    state = state_store(store)
    op = parts_op() if given == "requests" else parts_op(requests=None, input_file=str(_built_file(tmp_path)))

    result = op.execute(make_context(ti, state))

    by_id = {b["id"]: b for b in emu.batches("dashscope")}
    assert len(by_id) == 3
    batch_ids = ti.xcom("batch_ids")
    assert result["batch_ids"] == batch_ids
    assert [_part_ids(emu, by_id[batch_id]) for batch_id in batch_ids] == PART_IDS  # in input order
    assert result["request_counts"] == [100, 100, 50]
    assert result["request_count"] == 250
    assert result["input_file_ids"] == [by_id[i]["input_file_id"] for i in batch_ids]
    # The one-batch fields name the first part, as a one-part job's do.
    assert result["batch_id"] == ti.xcom("batch_id") == batch_ids[0]
    assert result["input_file_id"] == ti.xcom("input_file_id") == result["input_file_ids"][0]
    assert result["reattached"] is False
    # Each part has its own identity: the input's key with the part's index.
    keys = [by_id[i]["metadata"][KEY_METADATA] for i in batch_ids]
    context = make_context(ti)
    assert keys == [batch_key(context, result["input_fingerprint"], index) for index in range(3)]
    assert len(set(keys)) == 3
    assert result[KEY_METADATA] == keys[0]
    files = {f["id"]: f["filename"] for f in emu.files("dashscope")}
    assert [files[i] for i in result["input_file_ids"]] == [f"llmbatch-{key}.jsonl" for key in keys]
    stats = emu.stats("dashscope")
    assert (stats["files_uploaded"], stats["batches_created"]) == (3, 3)
    if state is not None:
        assert sorted(state.data[STATE_KEY]["records"]) == sorted(keys)
        assert [state.data[STATE_KEY]["records"][k]["batch_id"] for k in keys] == batch_ids
    assert len(json.dumps(result)) < 2000


@pytest.mark.parametrize("store", STORES)
def test_more_parts_than_max_batches_is_refused_before_any_request(connect: Any, store: str) -> None:
    emu = connect("dashscope")
    ti = FakeTI()
    state = state_store(store)

    with pytest.raises(InvalidInputError, match=r"needs 3 batches \(250 requests, .*more than max_batches=2"):
        parts_op(max_batches=2).execute(make_context(ti, state))

    assert emu.stats("dashscope")["operations"] == {}
    assert ti.pushed == []
    assert state is None or state.data == {}

    parts_op(max_batches=3).execute(make_context(FakeTI(), state_store(store)))
    assert emu.stats("dashscope")["batches_created"] == 3


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3", None])
def test_max_batches_must_be_a_whole_number(bad: Any) -> None:
    with pytest.raises(InvalidInputError, match="max_batches must be a whole number >= 1"):
        _op(input_file="x.jsonl", max_batches=bad)


def test_the_vendors_file_quota_is_checked_before_any_upload(connect: Any, tmp_path: Path) -> None:
    emu = connect("moonshot")
    spec = REGISTRY["moonshot"]
    assert spec.limits.max_batch_files == 1000
    hold_files(emu, "moonshot", 998)
    # 100,001 requests: three parts of Moonshot's 50,000 (no small endpoint, no limit swapped).
    path = tmp_path / "requests.jsonl"
    build_request_file(records(100_001), path, spec, model="kimi", whole_input=True)
    ti = FakeTI()

    with pytest.raises(InvalidInputError, match="at most 1000 batch files per account") as info:
        _op(input_file=str(path)).execute(make_context(ti, FakeStateStore()))

    assert "holds 998 and this job needs 3 more" in str(info.value)
    stats = emu.stats("moonshot")
    assert "upload" not in stats["operations"]
    assert (stats["files_uploaded"], stats["files"], stats["batches"]) == (0, 998, 0)
    assert ti.pushed == []
    # The boundary, on the hook: two more files fit, three do not.
    with BatchHook(CONN_ID) as hook:
        hook.check_file_quota(2)
        with pytest.raises(InvalidInputError, match="needs 3 more"):
            hook.check_file_quota(3)


def test_custom_ids_are_unique_over_all_parts(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    path = _built_file(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    lines[206] = lines[206].replace('"r206"', '"r5"')  # line 207, in the third part; r5 is on line 6
    path.write_text("".join(lines))

    with pytest.raises(InvalidRequestFileError) as info:
        parts_op(requests=None, input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))

    assert info.value.problems == [
        "line 207: custom_id: expected an id used once in the whole input (it is on line 6 already), "
        "got 'r5' again"
    ]
    assert emu.stats("dashscope")["operations"] == {}


def test_repeated_custom_ids_in_records_are_refused_before_any_request(connect: Any) -> None:
    emu = connect("dashscope")
    given = records(250)
    given[206]["custom_id"] = "r5"

    with pytest.raises(InvalidRequestFileError, match="custom_id"):
        parts_op(requests=given).execute(make_context(FakeTI(), FakeStateStore()))

    assert emu.stats("dashscope")["operations"] == {}


# -- a worker that dies between two parts ------------------------------------------------------------


@pytest.mark.parametrize("store", ["state_store", "metadata_only"])
@pytest.mark.parametrize("where", ["after_create_returned", "before_next_upload"])
@pytest.mark.parametrize("made", [1, 2])
def test_a_retry_after_a_death_between_parts_creates_each_part_once(
    connect: Any, monkeypatch: pytest.MonkeyPatch, made: int, where: str, store: str
) -> None:
    emu = connect("dashscope")
    state = FakeStateStore() if store == "state_store" else None
    real_create, real_upload = BatchHook.create_batch, BatchHook.upload_file
    calls = {"create": 0, "upload": 0}

    def create_then_die(self: BatchHook, **kwargs: Any) -> Any:
        batch = real_create(self, **kwargs)
        calls["create"] += 1
        if calls["create"] == made:
            raise RuntimeError(f"worker died right after part {made}'s create")
        return batch

    def die_before_upload(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        calls["upload"] += 1
        if calls["upload"] == made + 1:
            raise RuntimeError(f"worker died before part {made + 1}'s upload")
        return real_upload(self, *args, **kwargs)

    if where == "after_create_returned":
        monkeypatch.setattr(BatchHook, "create_batch", create_then_die)
    else:
        monkeypatch.setattr(BatchHook, "upload_file", die_before_upload)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    monkeypatch.setattr(BatchHook, "create_batch", real_create)
    monkeypatch.setattr(BatchHook, "upload_file", real_upload)
    earlier = [b["id"] for b in reversed(emu.batches("dashscope"))]  # oldest first
    assert len(earlier) == made

    retry = FakeTI()
    result = parts_op().execute(make_context(retry, state))

    stats = emu.stats("dashscope")
    # No part was created or uploaded twice: the earlier parts re-attached, the missing ones made.
    assert (stats["batches_created"], stats["batches"], stats["files_uploaded"]) == (3, 3, 3)
    assert result["batch_ids"][:made] == earlier
    assert result["reattached"] is False
    by_id = {b["id"]: b for b in emu.batches("dashscope")}
    assert [_part_ids(emu, by_id[i]) for i in result["batch_ids"]] == PART_IDS
    assert retry.xcom("batch_ids") == result["batch_ids"]

    again = parts_op().execute(make_context(FakeTI(), state))
    assert again["reattached"] is True
    assert again["batch_ids"] == result["batch_ids"]
    assert emu.stats("dashscope")["batches_created"] == 3


def test_a_kill_while_later_parts_upload_cancels_the_parts_made(
    connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("dashscope")
    op = parts_op()
    real_upload = BatchHook.upload_file
    uploads = {"n": 0}

    def upload_killed_at_the_third(self: BatchHook, *args: Any, **kwargs: Any) -> Any:
        uploads["n"] += 1
        if uploads["n"] == 3:
            op.on_kill()  # what the task runner calls, from its own thread, on SIGTERM
            raise RuntimeError("task killed")
        return real_upload(self, *args, **kwargs)

    monkeypatch.setattr(BatchHook, "upload_file", upload_killed_at_the_third)
    with pytest.raises(RuntimeError, match="task killed"):
        op.execute(make_context(FakeTI(), FakeStateStore()))

    statuses = [b["status"] for b in emu.batches("dashscope")]
    assert len(statuses) == 2
    assert all(status in ("cancelling", "cancelled") for status in statuses)
    assert emu.stats("dashscope")["cancels"] == 2


def test_on_kill_cancels_every_part(connect: Any) -> None:
    emu = connect("dashscope")
    op = parts_op()
    result = op.execute(make_context(FakeTI()))

    op.on_kill()

    assert [emu.batch("dashscope", i)["status"] for i in result["batch_ids"]] == ["cancelling"] * 3
    assert emu.stats("dashscope")["cancels"] == 3


# -- waiting for every part ----------------------------------------------------------------------------


def test_wait_for_completion_defers_once_for_every_part(connect: Any) -> None:
    connect("dashscope")
    ti = FakeTI()
    op = parts_op(wait_for_completion=True, deferrable=True, poll_interval=5, timeout=3600)

    with pytest.raises(TaskDeferred) as info:
        op.execute(make_context(ti))

    batch_ids = ti.xcom("batch_ids")
    _, kwargs = info.value.trigger.serialize()
    assert kwargs["batch_ids"] == batch_ids
    assert kwargs["batch_id"] is None
    extra = info.value.kwargs["extra"]
    assert extra["batch_ids"] == batch_ids
    summaries = [
        {"batch_id": i, "status": "completed", "request_counts": {"total": n, "completed": n, "failed": 0}}
        for i, n in zip(batch_ids, [100, 100, 50], strict=True)
    ]
    event = {"event": "terminal", "batch_id": batch_ids[0], "batch": summaries[0], "batches": summaries}

    result = _op(input_file="x", wait_for_completion=True).execute_complete(make_context(ti), event=event)

    assert result["batches"] == summaries
    assert result["batch_ids"] == batch_ids
    assert result["input_uri"] == extra["input_uri"]
    assert ti.xcom("batch_summaries") == summaries


@pytest.mark.parametrize("failing", [None, 1])
def test_wait_for_completion_on_the_worker_judges_every_part(
    connect: Any, monkeypatch: pytest.MonkeyPatch, failing: int | None
) -> None:
    emu = connect("dashscope")
    # The worker's clock moves the emulator's: each part runs its course, nobody waits.
    waits_on(Clock(on_sleep=emu.advance_clock), waiting, monkeypatch)
    ti = FakeTI()
    op = parts_op(wait_for_completion=True, deferrable=False, poll_interval=10, max_poll_interval=60)
    if failing is not None:
        real_create = BatchHook.create_batch

        def create_one_to_fail(self: BatchHook, **kwargs: Any) -> Any:
            batch = real_create(self, **kwargs)
            if len(emu.batches("dashscope")) == failing + 1:
                emu.force_status("dashscope", batch.id, "failed")
            return batch

        monkeypatch.setattr(BatchHook, "create_batch", create_one_to_fail)
        with pytest.raises(BatchFailedError, match=f"part {failing + 1} of 3") as info:
            op.execute(make_context(ti))
        assert info.value.batch_id == ti.xcom("batch_ids")[failing]
        assert [s["status"] for s in ti.xcom("batch_summaries")] == ["completed", "failed", "completed"]
        return

    result = op.execute(make_context(ti))

    assert [s["status"] for s in result["batches"]] == ["completed"] * 3
    assert [s["batch_id"] for s in result["batches"]] == result["batch_ids"] == ti.xcom("batch_ids")
    assert [s["request_counts"]["total"] for s in result["batches"]] == [100, 100, 50]
    assert ti.xcom("batch_summaries") == result["batches"]
