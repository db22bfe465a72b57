from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import conf
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch.exceptions import (
    BatchFailedError,
    InvalidInputError,
    InvalidRequestFileError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators import batch as batch_module
from airflow_provider_llmbatch.operators.batch import (
    KEY_METADATA,
    STATE_KEY,
    CancelBatchOperator,
    CreateBatchOperator,
)
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import CONN_ID, FakeStateStore, FakeTI, make_context, write_requests

VENDORS = list(REGISTRY)


def _op(**kwargs: Any) -> CreateBatchOperator:
    kwargs.setdefault("task_id", "create")
    kwargs.setdefault("conn_id", CONN_ID)
    return CreateBatchOperator(**kwargs)


def _input(tmp_path: Path, vendor: str, ids: list[str] | None = None) -> Path:
    return write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids or ["a", "b", "fail-c"])


def _store(kind: str) -> FakeStateStore | None:
    return FakeStateStore() if kind == "state_store" else None


STORES = ["state_store", "no_store"]
"""With a task state store a first try checks the file as it uploads; without one it checks first."""


def _checked_name(ti: FakeTI) -> re.Pattern[str]:
    tag = batch_module.task_tag(make_context(ti))
    return re.compile(rf"llmbatch-{tag}-[0-9a-f]{{16}}\.jsonl")


@pytest.fixture
def no_separate_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the operator validates the request file in a pass of its own."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the request file was validated in a separate pass")

    monkeypatch.setattr(batch_module, "validate_request_file", forbidden)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_uploads_creates_and_pushes_in_order(connect: Any, tmp_path: Path, vendor: str, store: str) -> None:
    emu = connect(vendor)
    path = _input(tmp_path, vendor)
    ti = FakeTI()

    result = _op(input_file=str(path), metadata={"team": "nlp"}).execute(make_context(ti, _store(store)))

    assert [k for k, _ in ti.pushed] == [
        "input_file_id",
        "batch_id",
        "conn_type",
        "input_fingerprint",
        "input_uri",
    ]
    stats = emu.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    [batch] = emu.batches(vendor)
    assert result["batch_id"] == batch["id"] == ti.xcom("batch_id")
    assert result["input_file_id"] == batch["input_file_id"] == ti.xcom("input_file_id")
    assert result["conn_type"] == ti.xcom("conn_type") == f"llmbatch_{vendor}"
    assert result["input_uri"] == ti.xcom("input_uri")
    assert result["request_count"] == 3
    assert result["input_uri"] == str(path)
    assert result["reattached"] is False
    assert result["endpoint"] == REGISTRY[vendor].default_endpoint
    assert batch["metadata"]["team"] == "nlp"
    assert batch["metadata"][KEY_METADATA] == result[KEY_METADATA]
    [file] = emu.files(vendor)
    if store == "state_store":
        # A first try checks the file as it uploads: the key is known only at the end, after the name.
        assert _checked_name(ti).fullmatch(file["filename"])
    else:
        assert file["filename"] == f"llmbatch-{result[KEY_METADATA]}.jsonl"
    assert file["bytes"] == path.stat().st_size
    assert emu.file_path(vendor, file["id"]).read_bytes() == path.read_bytes()
    assert len(json.dumps(result)) < 1000


@pytest.mark.usefixtures("no_separate_validation")
@pytest.mark.parametrize("vendor", VENDORS)
def test_first_try_checks_the_file_as_it_uploads(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    path = _input(tmp_path, vendor)
    store = FakeStateStore()
    ti = FakeTI()

    result = _op(input_file=str(path)).execute(make_context(ti, store))

    assert result["request_count"] == 3
    assert result["input_fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result[KEY_METADATA] == batch_module.batch_key(make_context(ti), result["input_fingerprint"])
    assert store.data[STATE_KEY] == {
        "key": result[KEY_METADATA],
        "input_file_id": result["input_file_id"],
        "fingerprint": result["input_fingerprint"],
        "batch_id": result["batch_id"],
    }
    [batch] = emu.batches(vendor)
    assert batch["metadata"][KEY_METADATA] == result[KEY_METADATA]
    assert emu.stats(vendor)["operations"]["upload"] == 1


def test_checked_upload_names_are_unique_per_upload() -> None:
    context = make_context(FakeTI())
    names = {batch_module.checked_upload_name(context) for _ in range(50)}
    assert len(names) == 50
    assert all(_checked_name(FakeTI()).fullmatch(name) for name in names)
    other = batch_module.checked_upload_name(make_context(FakeTI(map_index=1)))
    assert not _checked_name(FakeTI()).fullmatch(other)


@pytest.mark.parametrize("store", STORES)
def test_object_storage_uri_input(connect: Any, tmp_path: Path, store: str) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")

    result = _op(input_file=f"file://{path}").execute(make_context(FakeTI(), _store(store)))

    assert result["input_uri"] == f"file://{path}"
    assert result["request_count"] == 3
    assert emu.stats("openai")["files_uploaded"] == 1
    [file] = emu.files("openai")
    assert emu.file_path("openai", file["id"]).read_bytes() == path.read_bytes()


def test_bad_object_storage_input_uploads_nothing(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY["openai"], ["a", "a"])

    with pytest.raises(InvalidRequestFileError, match="line 2: custom_id"):
        _op(input_file=f"file://{path}").execute(make_context(FakeTI(), FakeStateStore()))

    assert emu.stats("openai")["files_uploaded"] == 0
    assert emu.files("openai") == []


@pytest.mark.usefixtures("no_separate_validation")
@pytest.mark.parametrize("store", STORES)
def test_requests_are_built_into_a_kept_request_file(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("zhipu")
    records = [{"custom_id": f"r{i}", "prompt": f"question {i}"} for i in range(4)]
    destination = tmp_path / "built" / "requests.jsonl"
    checks: list[Any] = []
    real_upload = BatchHook.upload_file

    def upload(self: BatchHook, source: Any, **kwargs: Any) -> Any:
        checks.append(kwargs.get("check"))
        return real_upload(self, source, **kwargs)

    # Checked while it was written: uploaded as it is, never checked a second time.
    monkeypatch.setattr(BatchHook, "upload_file", upload)
    result = _op(requests=records, model="glm-4-flash", request_file_destination=str(destination)).execute(
        make_context(FakeTI(), _store(store))
    )

    assert checks == [None]
    [file] = emu.files("zhipu")
    assert file["filename"] == f"llmbatch-{result[KEY_METADATA]}.jsonl"

    lines = [json.loads(line) for line in destination.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert {line["body"]["model"] for line in lines} == {"glm-4-flash"}
    assert result["input_uri"] == str(destination)
    assert result["request_count"] == 4
    assert emu.stats("zhipu")["batches_created"] == 1


def test_literal_requests_keep_jinja_syntax(connect: Any, tmp_path: Path) -> None:
    from airflow.sdk import literal

    connect("openai")
    destination = tmp_path / "requests.jsonl"
    op = _op(
        requests=literal([{"custom_id": "x", "prompt": "keep {{ this }} and {# that"}]),
        model="m",
        request_file_destination=str(destination),
    )
    context = make_context(FakeTI())
    op.render_template_fields(context)

    op.execute(context)

    line = json.loads(destination.read_text())
    assert line["body"]["messages"][-1]["content"] == "keep {{ this }} and {# that"


def test_requests_default_file_lives_under_airflow_home(connect: Any, airflow_home_dir: Path) -> None:
    connect("openai")
    ti = FakeTI(run_id="scheduled__2026-01-01T00:00:00+00:00", map_index=3)

    result = _op(requests=[{"prompt": "hi", "custom_id": "x"}], model="m").execute(make_context(ti))

    expected = airflow_home_dir / "llmbatch-requests" / "llmbatch_dag" / ti.run_id / "create.3.jsonl"
    assert result["input_uri"] == str(expected)
    assert expected.exists()


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_bad_request_file_uploads_nothing(connect: Any, tmp_path: Path, vendor: str, store: str) -> None:
    emu = connect(vendor)
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"custom_id": "a", "method": "POST", "url": "/nope", "body": {"model": "m"}})
        + "\n"
        + json.dumps({"method": "POST", "url": REGISTRY[vendor].default_endpoint, "body": {"model": "m"}})
        + "\n"
    )
    ti = FakeTI()
    state = _store(store)

    with pytest.raises(InvalidRequestFileError, match="line 1") as info:
        _op(input_file=str(path)).execute(make_context(ti, state))

    assert any("line 2" in p for p in info.value.problems)
    assert emu.stats(vendor)["files_uploaded"] == 0
    # A file that fits in the first chunk is checked whole before the request would start: no request.
    assert emu.stats(vendor)["operations"].get("upload", 0) == 0
    assert ti.pushed == []
    assert state is None or state.data == {}


def _big_request_file(path: Path, spec: Any, lines: int, *, bad_line: int | None = None) -> Path:
    """Write about 1 KB per request; line ``bad_line`` (1-based) lacks its body.model."""
    with path.open("w", encoding="utf-8") as handle:
        for n in range(1, lines + 1):
            body: dict[str, Any] = {
                "model": "test-model",
                "messages": [{"role": "user", "content": "x" * 900}],
            }
            if n == bad_line:
                del body["model"]
            line = {"custom_id": f"r{n}", "method": "POST", "url": spec.default_endpoint, "body": body}
            handle.write(json.dumps(line) + "\n")
    return path


def test_bad_line_near_the_end_of_a_large_file_leaves_nothing_at_the_vendor(
    connect: Any, tmp_path: Path
) -> None:
    emu = connect("openai")
    spec = REGISTRY["openai"]
    path = _big_request_file(tmp_path / "big.jsonl", spec, 4000, bad_line=3990)
    ti = FakeTI()
    state = FakeStateStore()

    with pytest.raises(InvalidRequestFileError) as info:
        _op(input_file=str(path)).execute(make_context(ti, state))

    assert info.value.problems == [
        "line 3990: body.model: expected a non-empty string, got nothing (the key is missing)"
    ]
    stats = emu.stats("openai")
    assert stats["operations"]["upload"] == 1  # the upload started, and was aborted unfinished
    assert (stats["files_uploaded"], stats["files"], stats["batches"]) == (0, 0, 0)
    assert emu.files("openai") == []
    assert ti.pushed == []
    assert state.data == {}


def test_bad_records_upload_nothing(connect: Any) -> None:
    emu = connect("moonshot")
    records = [{"custom_id": "a", "prompt": "hi", "params": {"temperature": 0.3}}]

    with pytest.raises(InvalidRequestFileError, match="temperature"):
        _op(requests=records, model="kimi").execute(make_context(FakeTI()))

    assert emu.stats("moonshot")["files_uploaded"] == 0


@pytest.mark.parametrize(
    ("vendor", "kwargs", "match"),
    [
        ("openai", {"input_file": "x.jsonl", "requests": [{"prompt": "p"}], "model": "m"}, "exactly one"),
        ("openai", {}, "exactly one"),
        ("openai", {"input_file": ""}, "empty string"),
        ("openai", {"requests": [{"prompt": "p"}]}, "model is required"),
        ("openai", {"requests": "[{'prompt': 'p'}]", "model": "m"}, "list of records"),
        ("openai", {"input_file": "x.jsonl", "endpoint": "/v4/chat/completions"}, "does not accept endpoint"),
        ("moonshot", {"input_file": "x.jsonl", "completion_window": "1h"}, "completion_window"),
        ("openai", {"input_file": "x.jsonl", "completion_window": "soon"}, "completion_window"),
        (
            "openai",
            {"input_file": "x.jsonl", "vendor_options": {"auto_delete_input_file": False}},
            "no create field",
        ),
        ("openai", {"input_file": "x.jsonl", "metadata": {"n": 1}}, "strings to strings"),
        ("openai", {"input_file": "x.jsonl", "metadata": {KEY_METADATA: "x"}}, "reserved"),
        ("openai", {"input_file": "x.jsonl", "metadata": {f"k{i}": "v" for i in range(16)}}, "at most 16"),
        ("dashscope", {"input_file": "x.jsonl", "metadata": {"ds_name": "n" * 101}}, "at most 100"),
    ],
)
def test_bad_arguments_upload_nothing(connect: Any, vendor: str, kwargs: dict[str, Any], match: str) -> None:
    emu = connect(vendor)

    with pytest.raises(InvalidInputError, match=match):
        _op(**kwargs).execute(make_context(FakeTI()))

    assert emu.stats(vendor)["files_uploaded"] == 0


def test_templated_values_are_validated_after_rendering(connect: Any, tmp_path: Path) -> None:
    emu = connect("moonshot")
    path = _input(tmp_path, "moonshot")
    # Validation must wait for rendering: constructing with template strings must not raise.
    op = _op(
        input_file="{{ params.path }}",
        completion_window="{{ params.window }}",
        params={"path": "", "window": ""},
    )
    context = make_context(FakeTI())

    context["params"] = {"path": str(path), "window": "2h"}
    op.render_template_fields(context)
    assert op.input_file == str(path)
    with pytest.raises(InvalidInputError, match="completion_window"):
        op.execute(context)
    assert emu.stats("moonshot")["files_uploaded"] == 0

    op = _op(input_file="{{ params.path }}", completion_window="{{ params.window }}")
    context["params"] = {"path": str(path), "window": "48h"}
    op.render_template_fields(context)
    assert op.execute(context)["batch_id"]


def test_template_fields_cover_user_arguments() -> None:
    assert set(CreateBatchOperator.template_fields) == {
        "conn_id",
        "input_file",
        "requests",
        "model",
        "endpoint",
        "completion_window",
        "metadata",
        "vendor_options",
        "request_file_destination",
    }
    assert _op(input_file="x").deferrable is conf.getboolean(
        "operators", "default_deferrable", fallback=False
    )


def test_vendor_options_reach_the_batch(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    path = _input(tmp_path, "dashscope")

    _op(input_file=str(path), vendor_options={"ds_name": "nightly"}).execute(make_context(FakeTI()))

    [batch] = emu.batches("dashscope")
    assert batch["metadata"]["ds_name"] == "nightly"


# -- retry safety -------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_crash_before_batch_id_push_reattaches(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    path = _input(tmp_path, vendor)
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
    path = _input(tmp_path, "zhipu")
    real_create = BatchHook.create_batch
    calls = {"n": 0}

    def create_once_dies(self: BatchHook, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("worker died before create")
        return real_create(self, **kwargs)

    monkeypatch.setattr(BatchHook, "create_batch", create_once_dies)
    ti = FakeTI()
    state = _store(store)
    with pytest.raises(RuntimeError, match="before create"):
        _op(input_file=str(path)).execute(make_context(ti, state))
    uploaded = ti.xcom("input_file_id")

    result = _op(input_file=str(path)).execute(make_context(ti, state))

    assert result["input_file_id"] == uploaded
    assert result["reattached"] is False
    stats = emu.stats("zhipu")
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("status", ["in_progress", "finalizing", "completed"])
def test_retry_reattaches_to_running_or_completed_batch(
    connect: Any, tmp_path: Path, status: str, store: str
) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    state = _store(store)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), state))
    emu.force_status("openai", first["batch_id"], status)

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), state))

    assert again["reattached"] is True
    assert again["batch_id"] == first["batch_id"]
    assert again["status"] == status
    assert again["input_file_id"] == first["input_file_id"]
    assert (emu.stats("openai")["batches_created"], emu.stats("openai")["files_uploaded"]) == (1, 1)


def test_emptied_state_store_still_reattaches_and_drops_its_own_upload(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), FakeStateStore()))

    # A fresh store (its rows cleaned up) reads as a first try: the file is checked as it uploads,
    # then the batch metadata finds the earlier batch and the new upload is deleted again.
    store = FakeStateStore()
    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert again["reattached"] is True
    assert again["batch_id"] == first["batch_id"]
    assert again["input_file_id"] == first["input_file_id"]
    stats = emu.stats("openai")
    assert (stats["batches_created"], stats["files_uploaded"], stats["files_deleted"]) == (1, 2, 1)
    assert [f["id"] for f in emu.files("openai")] == [first["input_file_id"]]
    assert store.data[STATE_KEY]["batch_id"] == first["batch_id"]


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("status", ["failed", "expired", "cancelled", "cancelling"])
def test_retry_after_a_dead_batch_creates_a_fresh_one(
    connect: Any, tmp_path: Path, status: str, store: str
) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    state = _store(store)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), state))
    emu.force_status("openai", first["batch_id"], status)

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), state))

    assert again["reattached"] is False
    assert again["batch_id"] != first["batch_id"]
    assert again[KEY_METADATA] == first[KEY_METADATA]
    assert emu.stats("openai")["batches_created"] == 2
    # The upload is reused: only the batch failed.
    assert again["input_file_id"] == first["input_file_id"]
    assert emu.stats("openai")["files_uploaded"] == 1


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
    path = _input(tmp_path, "openai")
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
    path = _input(tmp_path, "openai", ["a"])
    state = _store(store)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), state))
    emu.force_status("openai", first["batch_id"], status)
    _input(tmp_path, "openai", ["b"])  # the same size, other content

    second = _op(input_file=str(path)).execute(make_context(FakeTI(), state))

    assert second["input_fingerprint"] != first["input_fingerprint"]
    assert second["batch_id"] != first["batch_id"]
    assert second["input_file_id"] != first["input_file_id"]
    assert second["reattached"] is False
    assert emu.stats("openai")["batches_created"] == 2
    assert emu.stats("openai")["files_uploaded"] == 2
    [batch] = [b for b in emu.batches("openai") if b["id"] == second["batch_id"]]
    assert emu.file_path("openai", batch["input_file_id"]).read_bytes() == path.read_bytes()


@pytest.mark.usefixtures("no_separate_validation")
@pytest.mark.parametrize("store", STORES)
def test_reattach_disabled_always_creates(connect: Any, tmp_path: Path, store: str) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    state = _store(store)
    _op(input_file=str(path), reattach=False).execute(make_context(FakeTI(), state))
    _op(input_file=str(path), reattach=False).execute(make_context(FakeTI(), state))

    stats = emu.stats("openai")
    assert stats["batches_created"] == 2
    assert stats["files_uploaded"] == 2
    # Nothing is looked up, so nothing needs the key before the upload: checked as it uploads.
    assert stats["operations"].get("list_batches", 0) == stats["operations"].get("list_files", 0) == 0


def test_task_state_store_is_used_first(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    store = FakeStateStore()
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))
    assert store.data[STATE_KEY] == {
        "key": first[KEY_METADATA],
        "input_file_id": first["input_file_id"],
        "fingerprint": first["input_fingerprint"],
        "batch_id": first["batch_id"],
    }

    def no_listing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the state store should have answered")

    monkeypatch.setattr(BatchHook, "find_batch", no_listing)
    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert again["reattached"] is True
    assert again["batch_id"] == first["batch_id"]
    assert emu.stats("openai")["operations"].get("list_batches", 0) == 1  # the first try's lookup only


def test_state_store_for_other_input_is_ignored(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    store = FakeStateStore()
    store.data[STATE_KEY] = {"key": "not-this-one", "batch_id": "batch_other", "input_file_id": "file-other"}

    result = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert result["reattached"] is False
    assert emu.stats("openai")["batches_created"] == 1


def test_broken_state_store_falls_back_to_metadata_lookup(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    store = FakeStateStore(broken=True)
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    assert store.reads >= 2
    assert again["batch_id"] == first["batch_id"]
    assert emu.stats("openai")["batches_created"] == 1


def test_state_store_pointing_at_a_vanished_batch(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    store = FakeStateStore()
    first = _op(input_file=str(path)).execute(make_context(FakeTI(), store))
    store.data[STATE_KEY]["batch_id"] = "batch_does_not_exist"

    again = _op(input_file=str(path)).execute(make_context(FakeTI(), store))

    # Still found through the metadata key.
    assert again["batch_id"] == first["batch_id"]
    assert emu.stats("openai")["batches_created"] == 1


# -- kill, wait ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_on_kill_cancels_the_created_batch(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    op = _op(input_file=str(_input(tmp_path, vendor)))
    result = op.execute(make_context(FakeTI()))

    op.on_kill()

    assert emu.batch(vendor, result["batch_id"])["status"] in ("cancelling", "cancelled")
    assert emu.stats(vendor)["cancels"] == 1


def test_on_kill_respects_cancel_on_kill_and_finished_batches(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = _input(tmp_path, "openai")
    keep = _op(input_file=str(path), cancel_on_kill=False)
    kept = keep.execute(make_context(FakeTI()))
    keep.on_kill()
    assert emu.batch("openai", kept["batch_id"])["status"] == "validating"

    done = _op(input_file=str(path))
    finished = done.execute(make_context(FakeTI(run_id="other")))
    emu.force_status("openai", finished["batch_id"], "completed")
    done.on_kill()
    assert emu.batch("openai", finished["batch_id"])["status"] == "completed"
    assert emu.stats("openai")["cancels"] == 0

    _op(input_file=str(path)).on_kill()  # nothing created: nothing to do


def test_wait_for_completion_on_the_worker(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("zhipu")
    from airflow_provider_llmbatch.sensors import batch as sensor_module

    def sleep_by_finishing(_: float) -> None:
        for batch in emu.batches("zhipu"):
            if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                emu.force_status("zhipu", batch["id"], "completed")

    monkeypatch.setattr(sensor_module, "sleep", sleep_by_finishing)
    ti = FakeTI()
    op = _op(
        input_file=str(_input(tmp_path, "zhipu", ["a", "b", "fail-c"])),
        wait_for_completion=True,
        deferrable=False,
        poll_interval=0.01,
        max_failed_fraction=0.5,
    )

    result = op.execute(make_context(ti))

    assert result["status"] == "completed"
    assert result["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert result["input_uri"].endswith("requests.jsonl")
    assert result["reattached"] is False
    assert ti.xcom("batch_summary")["status"] == "completed"


def test_wait_for_completion_judges_failures(
    connect: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("openai")
    from airflow_provider_llmbatch.sensors import batch as sensor_module

    def sleep_by_failing(_: float) -> None:
        for batch in emu.batches("openai"):
            if batch["status"] == "validating":
                emu.force_status("openai", batch["id"], "failed")

    monkeypatch.setattr(sensor_module, "sleep", sleep_by_failing)
    op = _op(input_file=str(_input(tmp_path, "openai")), wait_for_completion=True, deferrable=False)

    with pytest.raises(BatchFailedError):
        op.execute(make_context(FakeTI()))


def test_wait_for_completion_defers_with_the_result(connect: Any, tmp_path: Path) -> None:
    connect("moonshot")
    ti = FakeTI()
    op = _op(
        input_file=str(_input(tmp_path, "moonshot")),
        wait_for_completion=True,
        deferrable=True,
        poll_interval=5,
        max_poll_interval=60,
        timeout=3600,
    )

    with pytest.raises(TaskDeferred) as info:
        op.execute(make_context(ti))

    # The batch id is pushed before deferring, for the console link.
    assert ti.xcom("batch_id")
    trigger = info.value.trigger
    assert isinstance(trigger, BatchTrigger)
    _, kwargs = trigger.serialize()
    assert kwargs["batch_id"] == ti.xcom("batch_id")
    assert kwargs["conn_id"] == CONN_ID
    extra = info.value.kwargs["extra"]
    assert extra["batch_id"] == ti.xcom("batch_id")
    assert extra["input_uri"].endswith("requests.jsonl")
    json.dumps(extra)

    summary = {
        "batch_id": extra["batch_id"],
        "status": "completed",
        "request_counts": {"total": 3, "completed": 3, "failed": 0},
    }
    fresh = _op(input_file="x", wait_for_completion=True, deferrable=True)
    result = fresh.execute_complete(
        make_context(ti),
        event={"event": "terminal", "batch": summary, "message": "", "polls": 2},
        extra=extra,
    )
    assert result["status"] == "completed"
    assert result["input_uri"] == extra["input_uri"]

    # dag.test() resumes without the deferral kwargs: the result is read back from XCom.
    assert ti.xcom("create_result") == extra
    resumed = fresh.execute_complete(
        make_context(ti), event={"event": "terminal", "batch": summary, "message": "", "polls": 2}
    )
    assert resumed == result


def test_cancel_operator(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    created = _op(input_file=str(_input(tmp_path, "dashscope"))).execute(make_context(FakeTI()))
    ti = FakeTI(task_id="cancel")

    summary = CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=created["batch_id"]).execute(
        make_context(ti)
    )

    assert summary["status"] in ("cancelling", "cancelled")
    assert ti.xcom("batch_id") == created["batch_id"]
    emu.force_status("dashscope", created["batch_id"], "cancelled")
    again = CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=created["batch_id"]).execute(
        make_context(FakeTI())
    )
    assert again["status"] == "cancelled"
    assert emu.stats("dashscope")["cancels"] == 1

    with pytest.raises(InvalidInputError):
        CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=" ").execute(make_context(FakeTI()))


def test_identity_key_is_short_and_stable() -> None:
    context = make_context(FakeTI())
    key = batch_module.batch_key(context, "f" * 64)
    assert key == batch_module.batch_key(make_context(FakeTI()), "f" * 64)
    assert len(key) == 32
    assert key != batch_module.batch_key(context, "e" * 64)
