"""
CreateBatchOperator: check the request file (or build it), upload it, create the batch, push, wait.

Nothing is sent before every argument and the whole file have passed; an input split into several
batches is in ``test_create_parts.py``, what a retried or cleared task finds of its earlier try in
``test_reattach.py``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import conf
from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.exceptions import (
    BatchFailedError,
    InvalidInputError,
    InvalidRequestFileError,
)
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.reattach import (
    KEY_METADATA,
    STATE_KEY,
    batch_key,
)
from airflow_provider_llmbatch.triggers.batch import BatchTrigger
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    STORES,
    FakeStateStore,
    FakeTI,
    make_context,
    request_file,
    state_store,
    write_requests,
)
from tests.operators.conftest import create_op as _op

VENDORS = list(REGISTRY)


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("vendor", VENDORS)
def test_uploads_creates_and_pushes_in_order(connect: Any, tmp_path: Path, vendor: str, store: str) -> None:
    emu = connect(vendor)
    path = request_file(tmp_path, vendor)
    ti = FakeTI()

    result = _op(input_file=str(path), metadata={"team": "nlp"}).execute(make_context(ti, state_store(store)))

    assert [k for k, _ in ti.pushed] == [
        "input_file_id",
        "batch_id",
        "batch_ids",
        "conn_type",
        "input_fingerprint",
        "input_uri",
    ]
    stats = emu.stats(vendor)
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    [batch] = emu.batches(vendor)
    assert result["batch_id"] == batch["id"] == ti.xcom("batch_id")
    assert result["batch_ids"] == [batch["id"]] == ti.xcom("batch_ids")
    assert result["input_file_id"] == batch["input_file_id"] == ti.xcom("input_file_id")
    assert result["input_file_ids"] == [batch["input_file_id"]]
    assert result["request_counts"] == [3]
    assert result["conn_type"] == ti.xcom("conn_type") == f"llmbatch_{vendor}"
    assert result["input_uri"] == ti.xcom("input_uri")
    assert result["request_count"] == 3
    assert result["input_uri"] == str(path)
    assert result["reattached"] is False
    assert result["endpoint"] == REGISTRY[vendor].default_endpoint
    assert batch["metadata"]["team"] == "nlp"
    assert batch["metadata"][KEY_METADATA] == result[KEY_METADATA]
    [file] = emu.files(vendor)
    # The whole file is checked before the upload: its key names the upload on every try.
    assert file["filename"] == f"llmbatch-{result[KEY_METADATA]}.jsonl"
    assert file["bytes"] == path.stat().st_size
    assert emu.file_path(vendor, file["id"]).read_bytes() == path.read_bytes()
    assert len(json.dumps(result)) < 1000


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_first_try_looks_nothing_up_and_records_it(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    path = request_file(tmp_path, vendor)
    store = FakeStateStore()
    ti = FakeTI()

    result = _op(input_file=str(path)).execute(make_context(ti, store))

    assert result["request_count"] == 3
    assert result["input_fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # A one-part input keeps the key it always had: a retry of the release before parts still finds it.
    assert result[KEY_METADATA] == batch_key(make_context(ti), result["input_fingerprint"])
    assert store.data[STATE_KEY] == {
        "records": {
            result[KEY_METADATA]: {
                "key": result[KEY_METADATA],
                "input_file_id": result["input_file_id"],
                "fingerprint": result["input_fingerprint"],
                "batch_id": result["batch_id"],
            }
        }
    }
    [batch] = emu.batches(vendor)
    assert batch["metadata"][KEY_METADATA] == result[KEY_METADATA]
    # An empty task state store rules out an earlier try: no batch or file look-up, only the quota's
    # file count where the vendor has a quota.
    quota = {"list_files": 1} if REGISTRY[vendor].limits.max_batch_files else {}
    assert emu.stats(vendor)["operations"] == {**quota, "upload": 1, "create": 1}


@pytest.mark.parametrize("store", STORES)
def test_object_storage_uri_input(connect: Any, tmp_path: Path, store: str) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")

    result = _op(input_file=f"file://{path}").execute(make_context(FakeTI(), state_store(store)))

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

    assert emu.stats("openai")["operations"] == {}
    assert emu.files("openai") == []


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

    # Checked before the upload: sent as it is, never checked again on the way.
    monkeypatch.setattr(BatchHook, "upload_file", upload)
    result = _op(requests=records, model="glm-4-flash", request_file_destination=str(destination)).execute(
        make_context(FakeTI(), state_store(store))
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
    state = state_store(store)

    with pytest.raises(InvalidRequestFileError, match="line 1") as info:
        _op(input_file=str(path)).execute(make_context(ti, state))

    assert any("line 2" in p for p in info.value.problems)
    # The whole file is checked before anything is sent: not a look-up, not an upload.
    assert emu.stats(vendor)["operations"] == {}
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


def test_bad_line_near_the_end_of_a_large_file_costs_no_request(connect: Any, tmp_path: Path) -> None:
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
    # Checked whole before the first upload: the vendor heard nothing, even on a first try.
    assert emu.stats("openai")["operations"] == {}
    assert ti.pushed == []
    assert state.data == {}


def test_bad_records_upload_nothing(connect: Any) -> None:
    emu = connect("moonshot")
    records = [{"custom_id": "a", "prompt": "hi", "params": {"temperature": 0.3}}]

    with pytest.raises(InvalidRequestFileError, match="temperature"):
        _op(requests=records, model="kimi").execute(make_context(FakeTI(), FakeStateStore()))

    assert emu.stats("moonshot")["operations"] == {}


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
        # Two pairs are the provider's (llmbatch_key, llmbatch_idem): 15 of the user's are one too many.
        ("openai", {"input_file": "x.jsonl", "metadata": {f"k{i}": "v" for i in range(15)}}, "at most 16"),
        ("dashscope", {"input_file": "x.jsonl", "metadata": {"ds_name": "n" * 101}}, "at most 100"),
    ],
)
def test_bad_arguments_upload_nothing(connect: Any, vendor: str, kwargs: dict[str, Any], match: str) -> None:
    emu = connect(vendor)

    with pytest.raises(InvalidInputError, match=match):
        _op(**kwargs).execute(make_context(FakeTI()))

    assert emu.stats(vendor)["operations"] == {}


RESERVED = ["llmbatch_key", "llmbatch_idem", "llmbatch_anything", "llmbatch_"]


@pytest.mark.parametrize("source", ["input_file", "requests"])
@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("key", RESERVED)
def test_reserved_metadata_keys_are_refused_before_any_upload(
    connect: Any, tmp_path: Path, key: str, store: str, source: str
) -> None:
    emu = connect("openai")
    given: dict[str, Any] = (
        {"input_file": str(request_file(tmp_path, "openai"))}
        if source == "input_file"
        else {"requests": [{"custom_id": "a", "prompt": "hi"}], "model": "m"}
    )
    ti = FakeTI()

    with pytest.raises(
        InvalidInputError, match=f"metadata key '{key}': keys starting with 'llmbatch_' are reserved"
    ):
        _op(metadata={"team": "nlp", key: "mine"}, **given).execute(make_context(ti, state_store(store)))

    assert emu.stats("openai")["operations"] == {}  # not even a look-up: nothing was sent
    assert ti.pushed == []


@pytest.mark.parametrize("vendor", VENDORS)
def test_reserved_metadata_keys_are_refused_for_every_vendor(
    connect: Any, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    with pytest.raises(InvalidInputError, match="reserved"):
        _op(input_file=str(request_file(tmp_path, vendor)), metadata={KEY_METADATA: "x" * 32}).execute(
            make_context(FakeTI(), FakeStateStore())
        )
    assert emu.stats(vendor)["operations"] == {}


def test_metadata_leaves_room_for_the_providers_keys(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    metadata = {f"k{i}": "v" for i in range(13)}
    path = request_file(tmp_path, "openai")
    _op(input_file=str(path), metadata=metadata).execute(make_context(FakeTI()))
    [batch] = emu.batches("openai")
    assert len(batch["metadata"]) == 16
    assert batch["metadata"].items() >= metadata.items()
    assert batch["metadata"]["llmbatch_requests"] == str(len(path.read_bytes().splitlines()))
    with pytest.raises(InvalidInputError, match="at most 16 metadata pairs"):
        _op(input_file=str(request_file(tmp_path, "openai")), metadata={**metadata, "k13": "v"}).execute(
            make_context(FakeTI())
        )


def test_templated_values_are_validated_after_rendering(connect: Any, tmp_path: Path) -> None:
    emu = connect("moonshot")
    path = request_file(tmp_path, "moonshot")
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
        "prices",
    }
    assert _op(input_file="x").deferrable is conf.getboolean(
        "operators", "default_deferrable", fallback=False
    )


def test_vendor_options_reach_the_batch(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    path = request_file(tmp_path, "dashscope")

    _op(input_file=str(path), vendor_options={"ds_name": "nightly"}).execute(make_context(FakeTI()))

    [batch] = emu.batches("dashscope")
    assert batch["metadata"]["ds_name"] == "nightly"


# -- kill, wait ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_on_kill_cancels_the_created_batch(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    op = _op(input_file=str(request_file(tmp_path, vendor)))
    result = op.execute(make_context(FakeTI()))

    op.on_kill()

    assert emu.batch(vendor, result["batch_id"])["status"] in ("cancelling", "cancelled")
    assert emu.stats(vendor)["cancels"] == 1


def test_on_kill_respects_cancel_on_kill_and_finished_batches(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = request_file(tmp_path, "openai")
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

    def sleep_by_finishing(_: float) -> None:
        for batch in emu.batches("zhipu"):
            if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                emu.force_status("zhipu", batch["id"], "completed")

    monkeypatch.setattr(waiting, "sleep", sleep_by_finishing)
    ti = FakeTI()
    op = _op(
        input_file=str(request_file(tmp_path, "zhipu", ["a", "b", "fail-c"])),
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

    def sleep_by_failing(_: float) -> None:
        for batch in emu.batches("openai"):
            if batch["status"] == "validating":
                emu.force_status("openai", batch["id"], "failed")

    monkeypatch.setattr(waiting, "sleep", sleep_by_failing)
    op = _op(input_file=str(request_file(tmp_path, "openai")), wait_for_completion=True, deferrable=False)

    with pytest.raises(BatchFailedError):
        op.execute(make_context(FakeTI()))


def test_wait_for_completion_defers_with_the_result(connect: Any, tmp_path: Path) -> None:
    connect("moonshot")
    ti = FakeTI()
    op = _op(
        input_file=str(request_file(tmp_path, "moonshot")),
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
    assert "batch_ids" not in kwargs  # one batch: the trigger as the release before parts wrote it
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
