from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow_env import EXAMPLE_DAGS, REVIEWS_FILE, count_lines, env_for, failing_tail, read_jsonl

from airflow_provider_llmbatch.demo import LocalAirflow
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.vendors import REGISTRY

# (DAG, vendor, requests it sends): the request counts are the examples' own data.
CASES = [
    ("example_llmbatch_zhipu", "zhipu", 5),
    ("example_llmbatch_moonshot", "moonshot", 4),
    ("example_llmbatch_dashscope", "dashscope", 6),
    ("example_llmbatch_openai", "openai", 7),
    ("example_llmbatch_pipeline", "zhipu", count_lines(REVIEWS_FILE)),
]


@pytest.mark.parametrize("vendor", sorted(REGISTRY))
def test_every_vendor_has_an_example_dag(vendor: str) -> None:
    source = EXAMPLE_DAGS / f"example_llmbatch_{vendor}.py"
    assert source.is_file()
    assert f'CONN_ID = "llmbatch_{vendor}"' in source.read_text(encoding="utf-8")


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.parametrize(("dag_id", "vendor", "requests"), CASES, ids=[f"{d}-{v}" for d, v, _ in CASES])
def test_example_dag_runs_against_the_emulator(
    dag_id: str, vendor: str, requests: int, local_airflow: LocalAirflow, dag_emulator: Emulator
) -> None:
    run = local_airflow.dags_test(
        dag_id, env=env_for(dag_emulator, {"LLMBATCH_PIPELINE_VENDOR": vendor}), timeout=240
    )

    assert run.succeeded, failing_tail(run.log_path)
    assert run.tasks and set(run.tasks.values()) == {"success"}, run.tasks
    created = run.xcoms["create_batch"]
    batch_id = created["batch_id"]
    assert created["request_count"] == requests
    assert dag_emulator.batch(vendor, batch_id)["status"] == "completed"

    # The sensor found the batch still running and deferred: its trigger is in the database,
    # with the batch id and without the API key.
    assert any(kwargs is None or kwargs.get("batch_id") == batch_id for kwargs in run.deferrals), run.deferrals
    assert dag_emulator.api_key not in json.dumps(run.deferrals)
    assert run.xcoms["wait_for_batch"]["status"] == "completed"

    manifest = run.xcoms["fetch_results"]
    assert manifest["batch_id"] == batch_id
    assert manifest["counts"]["succeeded"] == requests
    rows = read_jsonl(manifest["result_uri"])
    assert len(rows) == requests
    assert {row["status"] for row in rows} == {"succeeded"}
    assert len({row["custom_id"] for row in rows}) == requests


@pytest.mark.airflow
@pytest.mark.integration
def test_pipeline_summary_counts_every_review(local_airflow: LocalAirflow, dag_emulator: Emulator) -> None:
    output_dir = local_airflow.home / "pipeline-output"
    run = local_airflow.dags_test(
        "example_llmbatch_pipeline",
        env=env_for(dag_emulator, {"LLMBATCH_PIPELINE_VENDOR": "dashscope", "LLMBATCH_OUTPUT_DIR": str(output_dir)}),
        timeout=240,
    )

    assert run.succeeded, failing_tail(run.log_path)
    reviews = read_jsonl(REVIEWS_FILE)
    summary_path = Path(run.xcoms["summarize"]["summary"].removeprefix("file://"))
    assert summary_path.is_relative_to(output_dir)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["vendor"] == "dashscope"
    assert summary["rows"] == len(reviews)
    assert summary["statuses"] == {"succeeded": len(reviews)}
    assert sum(summary["sentiment"].values()) == len(reviews)
    assert set(summary["by_product"]) == {review["product"] for review in reviews}
    rows = read_jsonl(summary["results"])
    assert [row["custom_id"] for row in rows] == [review["review_id"] for review in reviews]
