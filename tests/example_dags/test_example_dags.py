from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from airflow_env import EXAMPLE_DAGS, REVIEWS_FILE, env_for, failing_tail, read_jsonl

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import DagTestRun, LocalAirflow

REVIEWS = read_jsonl(REVIEWS_FILE)
S3_DAG = "example_llmbatch_s3"


@dataclass(frozen=True)
class Case:
    dag_id: str
    vendor: str
    requests: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.dag_id.removeprefix('example_llmbatch_')}-{self.vendor}"


# The request counts are the examples' own data; the pipeline runs once per vendor in the registry.
CASES = [
    Case("example_llmbatch_zhipu", "zhipu", 5),
    Case("example_llmbatch_moonshot", "moonshot", 4),
    Case("example_llmbatch_dashscope", "dashscope", 6),
    Case("example_llmbatch_openai", "openai", 7),
    # Its request file and results live on S3 (moto, on loopback: the example_s3 fixture).
    Case(S3_DAG, "zhipu", len(REVIEWS)),
    *(
        Case("example_llmbatch_pipeline", vendor, len(REVIEWS), {"LLMBATCH_PIPELINE_VENDOR": vendor})
        for vendor in REGISTRY
    ),
]
PIPELINE_CASES = [case for case in CASES if case.dag_id == "example_llmbatch_pipeline"]


@pytest.fixture(scope="module")
def example_runs(
    request: pytest.FixtureRequest,
    airflow_template: LocalAirflow,
    dag_emulator: Emulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, DagTestRun]:
    """Run the DAGs the selected tests need, one after the other in one Airflow process."""
    wanted = {
        item.callspec.params["case"].id
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    cases = [case for case in CASES if case.id in wanted]
    airflow = airflow_template.clone(tmp_path_factory.mktemp("example-dags") / "airflow-home")
    output = airflow.home / "pipeline-output"
    plan = [(case.dag_id, {**case.env, "LLMBATCH_OUTPUT_DIR": str(output / case.id)}) for case in cases]
    s3 = request.getfixturevalue("example_s3").env() if any(c.dag_id == S3_DAG for c in cases) else {}
    runs = airflow.run_dag_tests(plan, env=env_for(dag_emulator, s3), timeout=60 + 45 * len(plan))
    return {case.id: run for case, run in zip(cases, runs, strict=True)}


@pytest.mark.parametrize("vendor", sorted(REGISTRY))
def test_every_vendor_has_an_example_dag(vendor: str) -> None:
    source = EXAMPLE_DAGS / f"example_llmbatch_{vendor}.py"
    assert source.is_file()
    assert f'CONN_ID = "llmbatch_{vendor}"' in source.read_text(encoding="utf-8")


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(480)  # the first test to run also pays for running every DAG (see example_runs)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_example_dag_runs_against_the_emulator(
    case: Case, example_runs: dict[str, DagTestRun], dag_emulator: Emulator, request: pytest.FixtureRequest
) -> None:
    run = example_runs[case.id]

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    assert run.import_errors == {}
    assert set(run.tasks.values()) == {"success"}, run.tasks
    created = run.xcoms["create_batch"]
    batch_id = created["batch_id"]
    assert created["request_count"] == case.requests
    assert dag_emulator.batch(case.vendor, batch_id)["status"] == "completed"

    # The sensor found the batch still running and deferred: its trigger is in the database,
    # with this batch's id and without the API key.
    assert any(kwargs is None or kwargs.get("batch_id") == batch_id for kwargs in run.deferrals), (
        run.deferrals
    )
    assert dag_emulator.api_key not in json.dumps(run.deferrals)
    assert run.log_path is not None
    assert dag_emulator.api_key not in run.log_path.read_text(errors="replace")
    assert run.xcoms["wait_for_batch"]["status"] == "completed"

    manifest = run.xcoms["fetch_results"]
    assert manifest["batch_id"] == batch_id
    assert manifest["counts"]["succeeded"] == case.requests
    if case.dag_id == S3_DAG:
        assert manifest["result_uri"].startswith("s3://"), manifest["result_uri"]
        rows = request.getfixturevalue("example_s3").read_jsonl(manifest["result_uri"])
    else:
        rows = read_jsonl(manifest["result_uri"])
    assert len(rows) == case.requests
    assert {row["status"] for row in rows} == {"succeeded"}
    assert len({row["custom_id"] for row in rows}) == case.requests


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(480)
@pytest.mark.parametrize("case", PIPELINE_CASES, ids=[case.id for case in PIPELINE_CASES])
def test_pipeline_summary_counts_every_review(case: Case, example_runs: dict[str, DagTestRun]) -> None:
    run = example_runs[case.id]

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    summary_path = Path(run.xcoms["summarize"]["summary"].removeprefix("file://"))
    assert summary_path.parent.parent.name == case.id  # under this run's LLMBATCH_OUTPUT_DIR
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    assert summary["vendor"] == case.vendor
    assert summary["rows"] == len(REVIEWS)
    assert summary["statuses"] == {"succeeded": len(REVIEWS)}
    assert sum(summary["sentiment"].values()) == len(REVIEWS)
    assert set(summary["by_product"]) == {review["product"] for review in REVIEWS}
    rows = read_jsonl(summary["results"])
    assert [row["custom_id"] for row in rows] == [review["review_id"] for review in REVIEWS]
