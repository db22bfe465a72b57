"""The fetch with an output schema, usage and cost, against the emulator over loopback, for every vendor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import InvalidInputError, TooManyFailedRequestsError
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.usage import NO_TABLE
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import DS_TEST, DS_TEST_MODEL, FakeTI, make_context
from tests.typed.conftest import CONN_ID, Review, read_rows, write_requests

VENDORS = list(REGISTRY)
IDS = ["good-1", "prose-2", "wrong-3", "fail-4", "fenced-5"]
PRICES = {"currency": "CNY", "models": {"test-model": {"input_per_million": 2.0, "output_per_million": 8.0}}}


def _create(emu: Emulator, tmp_path: Path, vendor: str, ids: list[str] = IDS) -> tuple[str, Path]:
    path = write_requests(tmp_path / "requests.jsonl", vendor, ids)
    created = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(path)).execute(
        make_context(FakeTI())
    )
    emu.force_status(vendor, created["batch_id"], "completed")
    return created["batch_id"], path


def _fetch(batch_id: Any, path: Path, tmp_path: Path, **kwargs: Any) -> FetchBatchResultsOperator:
    kwargs.setdefault("destination", str(tmp_path / "out" / "results.jsonl"))
    return FetchBatchResultsOperator(
        task_id="fetch", conn_id=CONN_ID, batch_id=batch_id, input_file=str(path), **kwargs
    )


@pytest.mark.parametrize("vendor", VENDORS)
def test_each_answer_is_validated_and_invalid_ones_are_counted(
    connect: Any, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    batch_id, path = _create(emu, tmp_path, vendor)

    manifest = _fetch(batch_id, path, tmp_path, output_schema=Review, max_failed_fraction=1.0).execute(
        make_context(FakeTI(task_id="fetch"))
    )

    rows = {r["custom_id"]: r for r in read_rows(manifest["result_uri"])}
    assert [r["status"] for r in rows.values()] == [
        "succeeded",
        "invalid_output",
        "invalid_output",
        "failed",
        "succeeded",
    ]
    assert rows["good-1"]["output"] == {"label": "positive", "score": 0.9}
    assert rows["fenced-5"]["output"] == {"label": "positive", "score": 0.9}
    assert rows["good-1"]["error"] is None
    assert rows["prose-2"]["output"] is None
    assert rows["prose-2"]["error"]["code"] == "invalid_output"
    assert rows["prose-2"]["error"]["message"].startswith("the answer is not JSON")
    assert rows["wrong-3"]["error"]["message"].startswith("label:")
    # The raw answer stays in the row, so an invalid one can be looked at.
    assert rows["prose-2"]["response"]["choices"][0]["message"]["content"] == "I think it is positive."
    assert rows["fail-4"]["output"] is None
    assert rows["fail-4"]["error"]["code"] != "invalid_output"
    counts = manifest["counts"]
    assert counts == {
        "succeeded": 2,
        "invalid_output": 2,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 0,
        "total": 5,
    }
    assert json.loads(json.dumps(manifest)) == manifest


@pytest.mark.parametrize(("fails", "raises"), [(True, True), (False, False)])
def test_invalid_output_counts_against_the_threshold_only_when_asked(
    connect: Any, tmp_path: Path, fails: bool, raises: bool
) -> None:
    emu = connect("zhipu")
    batch_id, path = _create(emu, tmp_path, "zhipu")
    # 1 failed and 2 invalid of 5: 60% with invalid outputs counted, 20% without.
    fetch = _fetch(
        batch_id, path, tmp_path, output_schema=Review, max_failed_fraction=0.5, invalid_output_fails=fails
    )
    ti = FakeTI(task_id="fetch")
    if raises:
        with pytest.raises(TooManyFailedRequestsError, match=r"3 of 5 failed.*invalid_output 2.*60\.00%"):
            fetch.execute(make_context(ti))
        # Judged after landing: the rows are there for a look.
        assert len(read_rows(ti.xcom("result_uri"))) == 5
    else:
        manifest = fetch.execute(make_context(ti))
        assert manifest["counts"]["invalid_output"] == 2


def test_without_a_schema_rows_are_as_before(connect: Any, tmp_path: Path) -> None:
    emu = connect("moonshot")
    batch_id, path = _create(emu, tmp_path, "moonshot")

    manifest = _fetch(batch_id, path, tmp_path, max_failed_fraction=1.0).execute(make_context(FakeTI()))

    rows = read_rows(manifest["result_uri"])
    assert all("output" not in r for r in rows)
    assert "invalid_output" not in manifest["counts"]
    assert [r["status"] for r in rows].count("succeeded") == 4


@pytest.mark.parametrize("vendor", VENDORS)
def test_usage_and_cost_from_the_argument(connect: Any, tmp_path: Path, vendor: str) -> None:
    emu = connect(vendor)
    batch_id, path = _create(emu, tmp_path, vendor)

    manifest = _fetch(batch_id, path, tmp_path, prices=PRICES, max_failed_fraction=1.0).execute(
        make_context(FakeTI())
    )

    rows = read_rows(manifest["result_uri"])
    usage = manifest["usage"]
    assert usage["prompt_tokens"] == sum(r["usage"].get("prompt_tokens", 0) for r in rows) > 0
    assert usage["completion_tokens"] == sum(r["usage"].get("completion_tokens", 0) for r in rows) > 0
    assert manifest["parts"][0]["usage"] == usage
    cost = manifest["cost"]
    expected = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
    assert cost["currency"] == "CNY"
    assert cost["model"] == "test-model"
    assert cost["total"] == pytest.approx(expected)
    assert cost["parts"] == [pytest.approx(expected)]
    assert cost["reason"] is None


def test_cost_from_the_connection_extra(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope", prices=json.dumps(PRICES))
    batch_id, path = _create(emu, tmp_path, "dashscope")

    manifest = _fetch(batch_id, path, tmp_path, max_failed_fraction=1.0).execute(make_context(FakeTI()))

    assert manifest["cost"]["currency"] == "CNY"
    assert manifest["cost"]["total"] > 0


def test_prices_are_templated(connect: Any, tmp_path: Path) -> None:
    emu = connect("zhipu")
    batch_id, path = _create(emu, tmp_path, "zhipu")
    fetch = _fetch(batch_id, path, tmp_path, prices="{{ params.prices }}", max_failed_fraction=1.0)
    context = make_context(FakeTI())
    context["params"] = {"prices": json.dumps(PRICES)}  # as a JSON Variable renders

    fetch.render_template_fields(context)
    manifest = fetch.execute(context)

    assert (manifest["cost"]["currency"], manifest["cost"]["reason"]) == ("CNY", None)
    assert manifest["cost"]["total"] > 0


@pytest.mark.parametrize(
    ("prices", "reason"),
    [
        (None, NO_TABLE),
        (
            {"currency": "USD", "models": {"other-model": {"input_per_million": 1, "output_per_million": 1}}},
            "model 'test-model' is not in the price table (it prices other-model)",
        ),
    ],
)
def test_no_cost_says_why(connect: Any, tmp_path: Path, prices: Any, reason: str) -> None:
    emu = connect("openai")
    batch_id, path = _create(emu, tmp_path, "openai")

    manifest = _fetch(batch_id, path, tmp_path, prices=prices, max_failed_fraction=1.0).execute(
        make_context(FakeTI())
    )

    assert manifest["cost"] == {"total": None, "reason": reason}
    assert manifest["usage"]["total_tokens"] > 0


def test_usage_per_part_adds_up(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    records = [{"custom_id": f"good-{i}", "prompt": f"say good-{i}"} for i in range(250)]
    created = CreateBatchOperator(
        task_id="create", conn_id=CONN_ID, requests=records, model=DS_TEST_MODEL, endpoint=DS_TEST
    ).execute(make_context(FakeTI()))
    for batch_id in created["batch_ids"]:
        emu.force_status("dashscope", batch_id, "completed")
    prices = {"currency": "CNY", "models": {DS_TEST_MODEL: {"input_per_million": 1, "output_per_million": 3}}}

    manifest = FetchBatchResultsOperator(
        task_id="fetch",
        conn_id=CONN_ID,
        batch_id=created["batch_ids"],
        input_file=created["input_uri"],
        destination=str(tmp_path / "results.jsonl"),
        output_schema=Review,
        prices=prices,
    ).execute(make_context(FakeTI(task_id="fetch")))

    assert manifest["counts"]["succeeded"] == 250
    parts = manifest["parts"]
    assert len(parts) == 3
    rows = read_rows(manifest["result_uri"])
    for n, part in enumerate(parts):
        mine = rows[n * 100 : (n + 1) * 100]
        assert part["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in mine) > 0
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(p["usage"][field] for p in parts) == manifest["usage"][field]
    assert sum(manifest["cost"]["parts"]) == pytest.approx(manifest["cost"]["total"])


def test_a_schema_for_embeddings_is_refused_before_any_download(connect: Any, tmp_path: Path) -> None:
    emu = connect("openai")
    path = tmp_path / "emb.jsonl"
    line = {
        "custom_id": "e1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": "x"},
    }
    path.write_text(json.dumps(line) + "\n")
    created = CreateBatchOperator(
        task_id="create", conn_id=CONN_ID, input_file=str(path), endpoint="/v1/embeddings"
    ).execute(make_context(FakeTI()))
    emu.force_status("openai", created["batch_id"], "completed")
    downloads = emu.stats("openai")["downloads"]

    with pytest.raises(InvalidInputError, match="no answer text to validate"):
        _fetch(created["batch_id"], path, tmp_path, output_schema=Review).execute(make_context(FakeTI()))
    assert emu.stats("openai")["downloads"] == downloads
    assert not (tmp_path / "out").exists()
