from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, Asset

from airflow_provider_llmbatch.assets import results_asset
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import InvalidInputError, LLMBatchError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import CONN_ID, FakeTI, make_context, write_requests

VENDORS = list(REGISTRY)
IDS = ["a", "b", "fail-c", "d"]


def _create(emu: Emulator, tmp_path: Path, vendor: str, ids: list[str] = IDS) -> tuple[dict[str, Any], Path]:
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ids)
    created = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(path)).execute(
        make_context(FakeTI())
    )
    return created, path


def _fetch(**kwargs: Any) -> FetchBatchResultsOperator:
    kwargs.setdefault("task_id", "fetch")
    kwargs.setdefault("conn_id", CONN_ID)
    return FetchBatchResultsOperator(**kwargs)


def _rows(uri: str) -> list[dict[str, Any]]:
    path = Path(uri.removeprefix("file://"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _half_done(emu: Emulator, vendor: str, batch_id: str) -> None:
    """Move a batch half way through ``in_progress`` on the emulator's clock."""
    emu.advance_clock(20.0 + 50.0)
    assert emu.batch(vendor, batch_id)["status"] == "in_progress"


@pytest.mark.parametrize("vendor", VENDORS)
def test_completed_batch_is_landed_with_failures(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    created, path = _create(emu, tmp_path, vendor)
    emu.force_status(vendor, created["batch_id"], "completed")
    ti = FakeTI(task_id="fetch")
    context = make_context(ti)
    destination = tmp_path / "out" / "results.jsonl"

    with DAG("llmbatch_dag", schedule=None):
        fetch = _fetch(batch_id=created["batch_id"], input_file=str(path), destination=str(destination))
    manifest = fetch.execute(context)

    rows = _rows(manifest["result_uri"])
    assert manifest["result_uri"] == f"file://{destination.absolute()}"
    assert [r["custom_id"] for r in rows] == IDS
    assert [r["status"] for r in rows] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert rows[0]["response"]["choices"][0]["message"]["content"].startswith("echo:")
    assert rows[2]["error"]["code"]
    assert manifest["status"] == "completed"
    assert manifest["counts"] == {
        "succeeded": 3,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 0,
        "total": 4,
    }
    assert manifest["usage"]["total_tokens"] > 0
    assert not any(manifest["anomalies"].values())
    assert ti.xcom("result_uri") == manifest["result_uri"]
    assert len(json.dumps(manifest)) < 2000
    extra = context["outlet_events"][results_asset("llmbatch_dag", "fetch")].extra
    assert extra["result_uri"] == manifest["result_uri"]
    assert extra["batch_id"] == created["batch_id"]


def test_expired_batch_lands_done_and_expired_rows(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    ids = [f"r{i:02d}" for i in range(20)]
    created, path = _create(emu, tmp_path, "openai", ids)
    _half_done(emu, "openai", created["batch_id"])
    emu.force_status("openai", created["batch_id"], "expired")

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path)).execute(make_context(FakeTI()))

    counts = manifest["counts"]
    assert manifest["status"] == "expired"
    assert counts["total"] == 20
    assert 0 < counts["succeeded"] < 20
    assert counts["expired"] == 20 - counts["succeeded"]
    assert [r["custom_id"] for r in _rows(manifest["result_uri"])] == ids


@pytest.mark.parametrize("vendor", ["dashscope", "openai"])
def test_cancelled_batch_lands_cancelled_rows(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    ids = [f"r{i:02d}" for i in range(10)]
    created, path = _create(emu, tmp_path, vendor, ids)
    _half_done(emu, vendor, created["batch_id"])
    emu.force_status(vendor, created["batch_id"], "cancelled")

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path)).execute(make_context(FakeTI()))

    counts = manifest["counts"]
    assert manifest["status"] == "cancelled"
    assert counts["succeeded"] + counts["cancelled"] == 10
    assert counts["cancelled"] > 0
    assert {r["status"] for r in _rows(manifest["result_uri"])} <= {"succeeded", "cancelled"}


def test_failed_batch_lands_missing_rows(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    created, path = _create(emu, tmp_path, "dashscope")
    emu.force_status("dashscope", created["batch_id"], "failed")

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path)).execute(make_context(FakeTI()))

    assert manifest["counts"]["missing"] == 4
    assert manifest["counts"]["total"] == 4


def test_unfinished_batch_is_refused(connect: Any, tmp_path: Path) -> None:
    emu = connect("zhipu")
    created, path = _create(emu, tmp_path, "zhipu")

    with pytest.raises(LLMBatchError, match="once it has ended"):
        _fetch(batch_id=created["batch_id"], input_file=str(path)).execute(make_context(FakeTI()))
    assert emu.stats("zhipu")["downloads"] == 0


def test_input_downloaded_where_the_vendor_serves_it(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    created, _ = _create(emu, tmp_path, "openai")
    emu.force_status("openai", created["batch_id"], "completed")

    manifest = _fetch(batch_id=created["batch_id"]).execute(make_context(FakeTI()))

    assert [r["custom_id"] for r in _rows(manifest["result_uri"])] == IDS
    assert manifest["counts"]["succeeded"] == 3


def test_input_required_where_the_vendor_does_not_serve_it(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    created, _ = _create(emu, tmp_path, "dashscope")
    emu.force_status("dashscope", created["batch_id"], "completed")

    with pytest.raises(InvalidInputError, match="pass input_file="):
        _fetch(batch_id=created["batch_id"]).execute(make_context(FakeTI()))


def test_input_gone_at_the_vendor(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    created, _ = _create(emu, tmp_path, "openai")
    emu.force_status("openai", created["batch_id"], "completed")
    BatchHook(CONN_ID).delete_file(created["input_file_id"])

    with pytest.raises(InvalidInputError, match="gone at the vendor"):
        _fetch(batch_id=created["batch_id"]).execute(make_context(FakeTI()))


@pytest.mark.parametrize("vendor", VENDORS)
def test_delete_remote_files_after_landing(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    created, path = _create(emu, tmp_path, vendor)
    batch = emu.force_status(vendor, created["batch_id"], "completed")
    # Zhipu deletes the input file itself once the batch is done (auto_delete_input_file).
    ids = {batch["input_file_id"], batch["output_file_id"], batch["error_file_id"]} & {
        f["id"] for f in emu.files(vendor)
    }
    assert {batch["output_file_id"], batch["error_file_id"]} <= ids

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path), delete_remote_files=True).execute(
        make_context(FakeTI())
    )

    assert manifest["counts"]["total"] == 4
    assert not ids & {f["id"] for f in emu.files(vendor)}


def test_default_destination_under_airflow_home(connect: Any, tmp_path: Path, airflow_home_dir: Path) -> None:
    emu = connect("moonshot")
    created, path = _create(emu, tmp_path, "moonshot")
    emu.force_status("moonshot", created["batch_id"], "completed")
    ti = FakeTI(task_id="fetch", run_id="manual__2026-01-01T00:00:00+00:00")

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path)).execute(make_context(ti))

    expected = airflow_home_dir / "llmbatch-results" / "llmbatch_dag" / ti.run_id / "fetch.jsonl"
    assert manifest["result_uri"] == f"file://{expected}"
    assert expected.exists()


def test_file_uri_input_and_destination(connect: Any, tmp_path: Path) -> None:
    emu = connect("zhipu")
    created, path = _create(emu, tmp_path, "zhipu")
    emu.force_status("zhipu", created["batch_id"], "completed")
    uri = f"file://{tmp_path}/landed/results.jsonl"

    manifest = _fetch(batch_id=created["batch_id"], input_file=f"file://{path}", destination=uri).execute(
        make_context(FakeTI())
    )

    assert manifest["result_uri"] == uri
    assert len(_rows(uri)) == 4


def test_include_request(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    created, path = _create(emu, tmp_path, "openai")
    emu.force_status("openai", created["batch_id"], "completed")

    manifest = _fetch(batch_id=created["batch_id"], input_file=str(path), include_request=True).execute(
        make_context(FakeTI())
    )

    assert _rows(manifest["result_uri"])[0]["request"]["messages"][0]["content"] == "say a"


def test_outlets_keep_user_assets_and_add_the_results_asset() -> None:
    with DAG("llmbatch_dag", schedule=None):
        op = _fetch(batch_id="b", outlets=[Asset(uri="s3://bucket/other")])
    assert op.outlets == [Asset(uri="s3://bucket/other"), results_asset("llmbatch_dag", "fetch")]
    assert _fetch(batch_id="b").outlets == []  # outside a DAG: no asset to name
    assert set(FetchBatchResultsOperator.template_fields) == {
        "batch_id",
        "conn_id",
        "input_file",
        "destination",
        "prices",
    }


@pytest.mark.parametrize("batch_id", ["", "   ", None, 12, [], ["b1", "b1"], ["b1", ""], "['b1', 'b2']"])
def test_bad_batch_id(connect: Any, batch_id: Any) -> None:
    connect("openai")
    with pytest.raises(InvalidInputError, match="batch_id"):
        _fetch(batch_id=batch_id).execute(make_context(FakeTI()))


def test_templated_arguments_are_rendered_then_used(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    created, path = _create(emu, tmp_path, "openai")
    emu.force_status("openai", created["batch_id"], "completed")
    op = _fetch(batch_id="{{ params.batch }}", input_file="{{ params.path }}")
    context = make_context(FakeTI())
    context["params"] = {"batch": created["batch_id"], "path": str(path)}

    op.render_template_fields(context)

    assert op.execute(context)["batch_id"] == created["batch_id"]
