"""The large-job example: 120,000 requests, three batches, one deferral, one resubmission round."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from airflow_env import env_for, failing_tail, load_example

from airflow_provider_llmbatch.emulator import Emulator
from dev.local_airflow import LocalAirflow

DAG_ID = "example_llmbatch_large"


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_large_job_lands_every_request_once_and_resubmits_the_rate_limited(
    airflow_template: LocalAirflow, dag_emulator: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> None:
    example = load_example(DAG_ID)
    airflow = airflow_template.clone(tmp_path_factory.mktemp("example-large") / "airflow-home")
    output = airflow.home / "large-output"
    before = {b["id"] for b in dag_emulator.batches("openai")}
    (run,) = airflow.run_dag_tests(
        [(DAG_ID, {"LLMBATCH_OUTPUT_DIR": str(output)})], env=env_for(dag_emulator), timeout=540
    )

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    assert set(run.tasks.values()) == {"success"}, run.tasks
    created = run.xcoms["create_batches"]
    assert created["request_count"] == example.RECORDS
    assert len(created["batch_ids"]) >= 3
    assert sum(created["request_counts"]) == example.RECORDS
    # The sensor waited for every part in one deferral.
    assert any(kwargs and kwargs.get("batch_ids") == created["batch_ids"] for kwargs in run.deferrals)

    manifest = run.xcoms["fetch_results"]
    assert [p["batch_id"] for p in manifest["parts"]] == created["batch_ids"]
    assert len(manifest["rounds"]) == 1
    counts = manifest["counts"]
    assert counts["total"] == example.RECORDS
    ends = ("succeeded", "failed", "expired", "cancelled", "missing")
    assert sum(counts[end] for end in ends) == example.RECORDS
    assert counts["succeeded"] == example.RECORDS

    with open(manifest["result_uri"].removeprefix("file://"), "rb") as handle:
        rows = [json.loads(line) for line in handle]
    ids = [row["custom_id"] for row in rows]
    assert len(ids) == len(set(ids)) == example.RECORDS
    attempts = Counter(row["attempts"] for row in rows)
    retried = sum(1 for i in range(example.RECORDS) if i % example.RETRY_EVERY == 0)
    assert attempts == {1: example.RECORDS - retried, 2: retried}
    assert all(row["attempts"] == 2 for row in rows if row["custom_id"].startswith("retry-"))

    made = [b for b in dag_emulator.batches("openai") if b["id"] not in before]
    assert len(made) == len(created["batch_ids"]) + 1  # the parts and one round, each created once
