"""
OpenLineage: what the operators report, through OpenLineage's own extractor, and in a real Airflow.

The end-to-end test runs the example pipeline with ``dag.test()`` in an Airflow configured with
OpenLineage's file transport and reads the emitted COMPLETE events back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow_env import failing_tail, migrated_template, read_jsonl, slow_enough_emulator

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.lineage import RUN_FACET, BatchLineage, dataset_name, operator_lineage
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import REPO_ROOT, LocalAirflow
from tests.lineage.pipeline_run import FETCH_TASK, PIPELINE, PipelineRuns, run_pipeline
from tests.operators.conftest import FakeTI, make_context, write_requests

CONN_ID = "llmbatch_lineage"


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/data/requests.jsonl", ("file", "/data/requests.jsonl")),
        ("file:///data/requests.jsonl", ("file", "/data/requests.jsonl")),
        ("file://localhost/data/requests.jsonl", ("file", "/data/requests.jsonl")),
        ("file://nas-1/data/requests.jsonl", ("file://nas-1", "/data/requests.jsonl")),
        ("s3://bucket/results/2026-01-01.jsonl", ("s3://bucket", "results/2026-01-01.jsonl")),
        ("s3a://bucket/results/a.jsonl", ("s3://bucket", "results/a.jsonl")),
        ("gs://bucket/a/b.jsonl", ("gs://bucket", "a/b.jsonl")),
        ("gcs://bucket/a/b.jsonl", ("gs://bucket", "a/b.jsonl")),
        ("s3://AKIAKEY:s3cr3t@bucket/a.jsonl", ("s3://bucket", "a.jsonl")),
        ("s3://bucket", ("s3://bucket", "/")),
        ("s3://bucket/dir/a b é.jsonl", ("s3://bucket", "dir/a b é.jsonl")),
        ("/data/a b/日本.jsonl", ("file", "/data/a b/日本.jsonl")),
        # An Azure URI's container is no login: it is part of the namespace, as OpenLineage names it.
        (
            "abfss://reviews@acct.dfs.core.windows.net/results/a.jsonl",
            ("abfss://reviews@acct.dfs.core.windows.net", "results/a.jsonl"),
        ),
        (
            "wasbs://reviews@acct.blob.core.windows.net/a.jsonl",
            ("wasbs://reviews@acct.blob.core.windows.net", "a.jsonl"),
        ),
        (
            "abfs://reviews:s3cr3t@acct.dfs.core.windows.net/a.jsonl",
            ("abfs://acct.dfs.core.windows.net", "a.jsonl"),
        ),
    ],
)
def test_dataset_names_follow_openlineage_naming(location: str, expected: tuple[str, str]) -> None:
    assert dataset_name(location) == expected


def test_a_relative_path_is_named_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_name("requests.jsonl") == ("file", str(tmp_path / "requests.jsonl"))


@pytest.fixture
def run_operator(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Call ``execute`` outside the task runner, as the task runner would; return the result."""
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)

    def _run(op: Any) -> Any:
        return op.execute(make_context(FakeTI(dag_id="lineage_probe", task_id=op.task_id)))

    return _run


def _extracted(task: Any) -> Any:
    """Return what OpenLineage's listener would report for a task that succeeded."""
    from airflow.providers.openlineage.extractors.manager import ExtractorManager
    from airflow.utils.state import TaskInstanceState

    ti = SimpleNamespace(dag_id="lineage_probe", task_id=task.task_id, map_index=-1, try_number=1, task=task)
    return ExtractorManager().extract_metadata(
        dagrun=SimpleNamespace(run_id="manual__lineage"),
        task=task,
        task_instance_state=TaskInstanceState.SUCCESS,
        task_instance=ti,
    )


def _serialized(facet: Any) -> dict[str, Any]:
    from openlineage.client.serde import Serde

    value: dict[str, Any] = json.loads(Serde.to_json(facet))
    return value


@pytest.mark.integration
@pytest.mark.parametrize("vendor", sorted(REGISTRY))
def test_the_extractor_reports_both_files_and_the_batch(
    connect: Callable[..., str],
    emulator: Emulator,
    run_operator: Callable[..., Any],
    tmp_path: Path,
    vendor: str,
) -> None:
    connect(vendor, CONN_ID)
    spec = REGISTRY[vendor]
    requests = write_requests(tmp_path / "requests.jsonl", spec, ["a", "fail-b", "c"])
    results = tmp_path / "out" / "results.jsonl"
    with DAG("lineage_probe", schedule=None):
        create = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(requests))
        fetch = FetchBatchResultsOperator(
            task_id="fetch", conn_id=CONN_ID, batch_id="", input_file=str(requests), destination=str(results)
        )
    assert create.get_openlineage_facets_on_complete(None) is None  # nothing ran, nothing to report

    created = run_operator(create)
    emulator.force_status(vendor, created["batch_id"], "completed")
    fetch.batch_id = created["batch_id"]
    manifest = run_operator(fetch)

    created_lineage, fetched_lineage = _extracted(create), _extracted(fetch)

    request_dataset = ("file", str(requests))
    assert [(d.namespace, d.name) for d in created_lineage.inputs] == [request_dataset]
    assert created_lineage.outputs == []
    assert [(d.namespace, d.name) for d in fetched_lineage.inputs] == [request_dataset]
    assert [(d.namespace, d.name) for d in fetched_lineage.outputs] == [("file", str(results))]
    assert fetched_lineage.outputs[0].outputFacets["outputStatistics"].rowCount == 3

    facet = _serialized(created_lineage.run_facets[RUN_FACET])
    assert facet["vendor"] == vendor
    assert facet["connType"] == spec.conn_type
    assert facet["batchIds"] == [created["batch_id"]]
    assert facet["endpoint"] == spec.default_endpoint
    assert facet["model"] == "test-model"
    assert facet["requestCount"] == 3
    assert facet["_schemaURL"].startswith("https://openlineage.io/")
    external = created_lineage.run_facets["externalQuery"]
    assert (external.externalQueryId, external.source) == (created["batch_id"], spec.conn_type)

    facet = _serialized(fetched_lineage.run_facets[RUN_FACET])
    assert facet["batchIds"] == [created["batch_id"]]
    assert facet["status"] == "completed"
    assert facet["requestCount"] == 3
    assert facet["requestCounts"]["succeeded"] == 2
    assert facet["requestCounts"]["failed"] == 1
    assert manifest["counts"]["total"] == 3
    everything = json.dumps([_serialized(f) for f in [*created_lineage.run_facets.values()]])
    assert emulator.api_key not in everything


def test_a_fetch_without_input_file_reports_only_its_output() -> None:
    manifest = {"batch_ids": ["b1"], "result_uri": "s3://bucket/out.jsonl", "counts": {"total": 2}}
    facts = BatchLineage.of_fetch(manifest, conn_type="llmbatch_zhipu", endpoint=None, input_file=None)
    lineage = operator_lineage(facts)
    assert lineage is not None
    assert lineage.inputs == []
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("s3://bucket", "out.jsonl")]


def test_without_openlineage_nothing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    facts = BatchLineage(conn_type="llmbatch_zhipu", batch_ids=["b1"], inputs=["/data/requests.jsonl"])
    assert operator_lineage(facts) is not None
    monkeypatch.setitem(sys.modules, "openlineage.client.event_v2", None)  # import fails as if missing
    assert operator_lineage(facts) is None


def _child(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_operators_import_without_openlineage(tmp_path: Path) -> None:
    code = (
        "import sys, airflow.sdk; before = {m for m in sys.modules if 'openlineage' in m}; "
        "import airflow_provider_llmbatch.operators.batch, airflow_provider_llmbatch.operators.results; "
        "print(sorted({m for m in sys.modules if 'openlineage' in m} - before))"
    )
    env = {**LocalAirflow(tmp_path / "home").env(), "PYTHONPATH": str(REPO_ROOT)}
    assert _child(code, env) == "[]"


@pytest.mark.airflow
def test_openlineage_listens_only_when_configured(tmp_path: Path) -> None:
    """The suite's Airflow has no OpenLineage transport: its listener stays off, so runs are unchanged."""
    code = (
        "from airflow.providers.openlineage.plugins.openlineage import OpenLineageProviderPlugin as P; "
        "print(len(P.listeners))"
    )
    suite = LocalAirflow(tmp_path / "home").env()
    assert _child(code, suite) == "0"
    assert _child(code, {**suite, "AIRFLOW__OPENLINEAGE__TRANSPORT": '{"type": "console"}'}) == "1"


@pytest.fixture(scope="module")
def pipeline_with_lineage(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PipelineRuns, Path, Emulator]]:
    home = tmp_path_factory.mktemp("lineage")
    events = home / "openlineage-events.jsonl"
    transport = {"type": "file", "log_file_path": str(events), "append": True}
    env = {
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "tests",
    }
    template = migrated_template(tmp_path_factory)
    for emulator in slow_enough_emulator(time_scale=0.5):
        yield run_pipeline(template, home, emulator, env=env), events, emulator


def _complete(events: list[dict[str, Any]], task_id: str) -> dict[str, Any]:
    [event] = [
        e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == f"{PIPELINE}.{task_id}"
    ]
    return event


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_pipeline_reports_its_files_as_datasets(
    pipeline_with_lineage: tuple[PipelineRuns, Path, Emulator],
) -> None:
    runs, path, emulator = pipeline_with_lineage
    [run] = runs.runs
    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    assert path.exists(), failing_tail(run.log_path)
    events = read_jsonl(path)
    created, manifest = run.xcoms["create_batch"], run.xcoms[FETCH_TASK]
    requests = dataset_name(created["input_uri"])
    results = dataset_name(manifest["result_uri"])
    assert requests[0] == results[0] == "file"

    create = _complete(events, "create_batch")
    assert [(d["namespace"], d["name"]) for d in create["inputs"]] == [requests]
    facet = create["run"]["facets"][RUN_FACET]
    assert facet["batchIds"] == [created["batch_id"]]
    assert facet["connType"] == "llmbatch_zhipu"
    assert facet["model"] == "glm-4-flash"
    assert facet["requestCount"] == created["request_count"]

    fetch = _complete(events, FETCH_TASK)
    assert [(d["namespace"], d["name"]) for d in fetch["inputs"]] == [requests]
    assert [(d["namespace"], d["name"]) for d in fetch["outputs"]] == [results]
    assert fetch["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == manifest["counts"]["total"]
    assert fetch["run"]["facets"][RUN_FACET]["requestCounts"]["succeeded"] == manifest["counts"]["succeeded"]
    assert fetch["run"]["facets"]["externalQuery"]["externalQueryId"] == created["batch_id"]

    assert emulator.api_key not in path.read_text()
    assert "Failed to extract OpenLineage metadata" not in runs.log
