"""
Re-attaching: a retried or cleared task instance finds the batch and the upload it already paid for.

The matrix runs with the task state store (Airflow 3.3) and without it (the batch metadata look-up
alone); identity, the state store and the look-ups are also tested on their own, without an operator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.reattach import (
    KEY_METADATA,
    STATE_KEY,
    StateStore,
    Tracker,
    batch_key,
)
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import STORES, FakeStateStore, FakeTI, make_context, request_file, state_store
from tests.operators.conftest import create_op as _op
from tests.pollkit import RecordingLog

VENDORS = list(REGISTRY)


# -- retry safety -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_crash_before_batch_id_push_reattaches(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    path = request_file(tmp_path, vendor)
    ti = FakeTI(fail_on={"batch_id"})

    with pytest.raises(RuntimeError, match="worker died"):
        _op(input_file=str(path)).execute(make_context(ti))
    [first] = emu.batches(vendor)

    result = _op(input_file=str(path)).execute(make_context(ti))

    assert result["reattached"] is True
    assert result["batch_id"] == first["id"] == ti.xcom("batch_id")
    assert result["input_file_id"] == first["input_file_id"]
    stats = emu.stats(vendor)
    assert (stats["batches_created"], stats["files_uploaded"], stats["batches"]) == (1, 1, 1)


@pytest.mark.parametrize("store", STORES)
def test_crash_between_upload_and_create_reuses_the_upload(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("zhipu")
    path = request_file(tmp_path, "zhipu")
    real_create = BatchHook.create_batch
    calls = {"n": 0}

    def create_once_dies(self: BatchHook, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("worker died before create")
        return real_create(self, **kwargs)

    monkeypatch.setattr(BatchHook, "create_batch", create_once_dies)
    ti = FakeTI()
    state = state_store(store)
    with pytest.raises(RuntimeError, match="before create"):
        _op(input_file=str(path)).execute(make_context(ti, state))
    [uploaded] = [f["id"] for f in emu.files("zhipu")]

    result = _op(input_file=str(path)).execute(make_context(ti, state))

    assert result["input_file_id"] == uploaded
    assert result["reattached"] is False
    stats = emu.stats("zhipu")
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


def test_an_emptied_state_store_reads_as_a_first_try(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))

    # The design's trade-off, pinned so that changing it is a decision: a store that answers and holds
    # nothing rules out an earlier try, so a try whose rows were cleaned up in between (Airflow's
    # [state_store] clear_on_success, or retention) looks nothing up and pays for a fresh batch.
    store = FakeStateStore()
    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert again["reattached"] is False
    assert again["batch_id"] != first["batch_id"]
    assert again[KEY_METADATA] == first[KEY_METADATA]
    stats = emu.stats("openai")
    assert (stats["batches_created"], stats["files_uploaded"]) == (2, 2)
    assert "list_batches" not in stats["operations"]
    assert "list_files" not in stats["operations"]
    assert store.data[STATE_KEY]["records"][again[KEY_METADATA]]["batch_id"] == again["batch_id"]


# the earlier batch's status -> whether a retry re-attaches to it (otherwise: a fresh batch, same upload)
REATTACHES = {
    "validating": True,
    "in_progress": True,
    "finalizing": True,
    "completed": True,
    "failed": False,
    "expired": False,
    "cancelled": False,
    "cancelling": False,
}


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("status", REATTACHES)
def test_a_retry_reattaches_to_a_live_or_completed_batch_only(
    connect: Any, tmp_path: Path, status: str, store: str
) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    state = state_store(store)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), state))
    emu.force_status("openai", first["batch_id"], status)

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), state))

    assert again["reattached"] is REATTACHES[status]
    assert (again["batch_id"] == first["batch_id"]) is REATTACHES[status]
    assert again[KEY_METADATA] == first[KEY_METADATA]
    # The upload is reused either way: only a dead batch is made again.
    assert again["input_file_id"] == first["input_file_id"]
    stats = emu.stats("openai")
    assert (stats["batches_created"], stats["files_uploaded"]) == (1 if REATTACHES[status] else 2, 1)
    if REATTACHES[status]:
        assert again["status"] == status


@pytest.mark.parametrize(
    "change",
    [
        {"run_id": "manual__other"},
        {"task_id": "create_other"},
        {"dag_id": "other_dag"},
        {"map_index": 2},
    ],
)
def test_another_task_instance_gets_its_own_batch(
    connect: Any, tmp_path: Path, change: dict[str, Any]
) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    first = _op(input_file=str(path)).execute(make_context(FakeTI()))

    other = _op(input_file=str(path)).execute(make_context(FakeTI(**change)))

    assert other["batch_id"] != first["batch_id"]
    assert other["reattached"] is False
    assert emu.stats("openai")["batches_created"] == 2
    assert emu.stats("openai")["files_uploaded"] == 2


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("status", ["validating", "failed"])
def test_changed_input_gets_its_own_batch(connect: Any, tmp_path: Path, store: str, status: str) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai", ["a"])
    state = state_store(store)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), state))
    emu.force_status("openai", first["batch_id"], status)
    request_file(tmp_path, "openai", ["b"])  # the same size, other content

    second = _op(input_file=str(path)).execute(make_context(FakeTI(), state))

    assert second["input_fingerprint"] != first["input_fingerprint"]
    assert second["batch_id"] != first["batch_id"]
    assert second["input_file_id"] != first["input_file_id"]
    assert second["reattached"] is False
    assert emu.stats("openai")["batches_created"] == 2
    assert emu.stats("openai")["files_uploaded"] == 2
    [batch] = [b for b in emu.batches("openai") if b["id"] == second["batch_id"]]
    assert emu.file_path("openai", batch["input_file_id"]).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("store", STORES)
def test_reattach_disabled_always_creates(connect: Any, tmp_path: Path, store: str) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    state = state_store(store)
    _op(input_file=str(path), reattach=False).execute(make_context(FakeTI(), state))
    _op(input_file=str(path), reattach=False).execute(make_context(FakeTI(), state))

    stats = emu.stats("openai")
    assert stats["batches_created"] == 2
    assert stats["files_uploaded"] == 2
    # Nothing is looked up (OpenAI has no file quota to count).
    assert stats["operations"] == {"upload": 2, "create": 2}


def test_task_state_store_is_used_first(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    store = FakeStateStore()
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))
    assert store.data[STATE_KEY] == {
        "records": {
            first[KEY_METADATA]: {
                "key": first[KEY_METADATA],
                "input_file_id": first["input_file_id"],
                "fingerprint": first["input_fingerprint"],
                "batch_id": first["batch_id"],
            }
        }
    }

    def no_listing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the state store should have answered")

    monkeypatch.setattr(BatchHook, "find_batch", no_listing)
    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert again["reattached"] is True
    assert again["batch_id"] == first["batch_id"]
    # Neither try listed anything: the first had an empty store, the second read its batch from it.
    assert emu.stats("openai")["operations"] == {"upload": 1, "create": 1, "get_batch": 1}


@pytest.mark.parametrize("layout", ["records", "one record"])
def test_a_stored_batch_of_another_task_instance_is_never_taken(
    connect: Any, tmp_path: Path, layout: str
) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    others = _op(input_file=str(path)).execute(make_context(FakeTI(run_id="manual__other")))
    mine = batch_key(make_context(FakeTI()), others["input_fingerprint"])
    store = FakeStateStore()
    # The store (hand-edited, or a bug elsewhere) names this instance's key with another one's batch,
    # as this release writes it or as the release before parts did.
    record = {"key": mine, "batch_id": others["batch_id"], "input_file_id": "file-x"}
    store.data[STATE_KEY] = {"records": {mine: record}} if layout == "records" else record

    result = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert result["reattached"] is False
    assert result["batch_id"] != others["batch_id"]
    assert result[KEY_METADATA] == mine
    assert emu.batch("openai", result["batch_id"])["metadata"][KEY_METADATA] == mine
    assert emu.stats("openai")["batches_created"] == 2


def test_state_store_for_other_input_is_ignored(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    store = FakeStateStore()
    store.data[STATE_KEY] = {"key": "not-this-one", "batch_id": "batch_other", "input_file_id": "file-other"}

    result = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert result["reattached"] is False
    assert emu.stats("openai")["batches_created"] == 1


def test_broken_state_store_falls_back_to_metadata_lookup(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    store = FakeStateStore(broken=True)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert store.reads >= 2
    assert again["batch_id"] == first["batch_id"]
    assert emu.stats("openai")["batches_created"] == 1


def test_state_store_pointing_at_a_vanished_batch(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
    store = FakeStateStore()
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))
    store.data[STATE_KEY]["records"][first[KEY_METADATA]]["batch_id"] = "batch_does_not_exist"

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    # Still found through the metadata key.
    assert again["batch_id"] == first["batch_id"]
    assert emu.stats("openai")["batches_created"] == 1


def test_identity_key_is_short_and_stable() -> None:
    context = make_context(FakeTI())
    key = batch_key(context, "f" * 64)
    assert key == batch_key(make_context(FakeTI()), "f" * 64)
    assert len(key) == 32
    assert key != batch_key(context, "e" * 64)
    # Each part of a split input has a key of its own; a one-part input keeps the key without a part.
    parts = {batch_key(context, "f" * 64, index) for index in range(3)}
    assert len(parts) == 3
    assert key not in parts
    assert all(len(part) == 32 for part in parts)


# -- the task state store, on its own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "first_try", "stored"),
    [
        (None, False, {}),  # no store (before Airflow 3.3): an earlier try cannot be ruled out
        (FakeStateStore(), True, {}),
        (FakeStateStore(broken=True), False, {}),  # a store that fails is no store
        ("unreadable", False, {}),  # something an earlier try wrote, whatever it is
        ("other input", False, {}),  # an earlier try of another input: not this key's, but a try
        ("this input", False, {"key": "k1", "input_file_id": "file-1", "batch_id": "batch_1"}),
        ("parts", False, {"key": "k1", "input_file_id": "file-1", "batch_id": "batch_1"}),
    ],
    ids=["none", "empty", "broken", "unreadable", "other-input", "this-input", "parts"],
)
def test_what_the_state_store_tells(store: Any, first_try: bool, stored: dict[str, Any]) -> None:
    if isinstance(store, str):
        contents = {
            "unreadable": "garbage",
            "other input": {"key": "k0", "input_file_id": "file-0"},
            "this input": {"key": "k1", "input_file_id": "file-1", "batch_id": "batch_1"},
            "parts": {
                "records": {
                    "k0": {"key": "k0", "input_file_id": "file-0", "batch_id": "batch_0"},
                    "k1": {"key": "k1", "input_file_id": "file-1", "batch_id": "batch_1"},
                }
            },
        }[store]
        store = FakeStateStore()
        store.data[STATE_KEY] = contents
    log = RecordingLog()
    state = StateStore(make_context(FakeTI(), store), log)
    assert state.knows_no_earlier_try() is first_try
    assert state.get("k1") == stored
    if isinstance(store, FakeStateStore) and store.broken:
        assert "relying on the batch metadata look-up" in log.text("warning")
        state.set({"key": "k1"})  # and writing to it fails quietly too
    tracker = Tracker(make_context(FakeTI(), store), hook=None, log=log, enabled=False)  # type: ignore[arg-type]
    assert tracker.first_try() is True  # reattach=False: nothing to look for


def test_the_state_store_keeps_a_record_per_key_over_the_old_layout() -> None:
    old = {"key": "k0", "input_file_id": "file-0", "fingerprint": "f0", "batch_id": "batch_0"}
    store = FakeStateStore()
    store.data[STATE_KEY] = dict(old)  # as the release before parts wrote it
    state = StateStore(make_context(FakeTI(), store), RecordingLog())

    state.set({"key": "k1", "input_file_id": "file-1", "fingerprint": "f1"})
    state.set({"key": "k1", "input_file_id": "file-1", "fingerprint": "f1", "batch_id": "batch_1"})

    assert store.data[STATE_KEY] == {
        "records": {
            "k0": old,
            "k1": {"key": "k1", "input_file_id": "file-1", "fingerprint": "f1", "batch_id": "batch_1"},
        }
    }
    reread = StateStore(make_context(FakeTI(), store), RecordingLog())
    assert reread.get("k0") == old
    assert reread.get("k1")["batch_id"] == "batch_1"
    assert reread.knows_no_earlier_try() is False
