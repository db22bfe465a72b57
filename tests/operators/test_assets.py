"""
The results asset: one per landing task, declared at parse time, one event per landing with its file.

The real-Airflow test runs the example pipeline twice with ``dag.test()`` beside two DAGs scheduled on
the asset (one on the asset, one on its name) and reads the metadata database back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, Asset, AssetAlias
from airflow_env import failing_tail, migrated_template, slow_enough_emulator

from airflow_provider_llmbatch.assets import EVENT_EXTRA_KEYS, RESULTS_ASSET_GROUP, results_asset
from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.lineage.pipeline_run import (
    CONSUMER_ON_ASSET,
    CONSUMER_ON_NAME,
    FETCH_TASK,
    PIPELINE,
    RESULTS_ASSET,
    PipelineRuns,
    run_pipeline,
)
from tests.operators.conftest import CONN_ID, FakeTI, make_context, write_requests

NO_MODEL = "not found; cannot create asset event"
"""What Airflow logs for an event whose asset it has no model of (then it creates one per event)."""


def test_results_asset_is_named_after_the_dag_and_task() -> None:
    asset = results_asset("daily_reviews", "group.fetch")
    assert asset.name == "llmbatch-results/daily_reviews/group.fetch"
    assert asset.uri == "llmbatch://results/daily_reviews/group.fetch"
    assert asset.group == RESULTS_ASSET_GROUP


def test_each_task_declares_its_own_asset_beside_user_outlets() -> None:
    other = Asset(uri="s3://bucket/other")
    with DAG("llmbatch_assets", schedule=None):
        first = FetchBatchResultsOperator(task_id="fetch", batch_id="b", outlets=[other])
        second = FetchBatchResultsOperator(task_id="fetch_again", batch_id="b")
    assert first.outlets == [other, results_asset("llmbatch_assets", "fetch")]
    assert second.outlets == [results_asset("llmbatch_assets", "fetch_again")]
    # No alias: an alias adds a new asset (and a "not found" warning) for every file landed.
    assert not any(isinstance(outlet, AssetAlias) for outlet in first.outlets + second.outlets)


def test_a_given_asset_replaces_the_default_and_is_declared_once() -> None:
    mine = Asset(name="reviews-results", uri="s3://bucket/results/")
    with DAG("llmbatch_assets", schedule=None):
        op = FetchBatchResultsOperator(task_id="fetch", batch_id="b", results_asset=mine, outlets=[mine])
    assert op.outlets == [mine]
    assert op.results_asset == mine


def test_a_task_made_outside_a_dag_declares_no_asset() -> None:
    op = FetchBatchResultsOperator(task_id="fetch", batch_id="b")
    assert op.outlets == []
    assert op.results_asset is None


def test_a_mapped_task_announces_only_an_asset_its_partial_declared() -> None:
    mine = Asset(name="reviews-results", uri="s3://bucket/results/")
    with DAG("llmbatch_assets", schedule=None):
        plain = FetchBatchResultsOperator.partial(task_id="fetch").expand(batch_id=["a", "b"])
        declared = FetchBatchResultsOperator.partial(
            task_id="fetch_declared", results_asset=mine, outlets=[mine]
        ).expand(batch_id=["a", "b"])
    # What the worker runs: the asset added only now would have no model in the metadata database.
    unmapped = plain.unmap({"batch_id": "a", "params": {}})
    assert (unmapped.results_asset, unmapped.outlets) == (None, [])
    unmapped = declared.unmap({"batch_id": "a", "params": {}})
    assert (unmapped.results_asset, unmapped.outlets) == (mine, [mine])


@pytest.mark.parametrize("vendor", sorted(REGISTRY))
def test_landing_sets_the_event_extra_of_the_declared_asset(
    connect: Any, tmp_path: Path, vendor: str
) -> None:
    emu = connect(vendor)
    path = write_requests(tmp_path / "requests.jsonl", REGISTRY[vendor], ["a", "fail-b", "c"])
    created = CreateBatchOperator(task_id="create", conn_id=CONN_ID, input_file=str(path)).execute(
        make_context(FakeTI())
    )
    emu.force_status(vendor, created["batch_id"], "completed")
    with DAG("llmbatch_assets", schedule=None):
        fetch = FetchBatchResultsOperator(
            task_id="fetch", conn_id=CONN_ID, batch_id=created["batch_id"], input_file=str(path)
        )
    context = make_context(FakeTI(task_id="fetch"))

    manifest = fetch.execute(context)

    events = context["outlet_events"]
    # Only the declared asset has an event: nothing was added for the run's own file.
    assert [asset.name for asset in events] == [results_asset("llmbatch_assets", "fetch").name]
    extra = events[results_asset("llmbatch_assets", "fetch")].extra
    assert extra == {key: manifest[key] for key in EVENT_EXTRA_KEYS}
    assert extra["result_uri"] == manifest["result_uri"]
    assert extra["counts"]["failed"] == 1
    assert emu.api_key not in json.dumps(extra)


@pytest.fixture(scope="module")
def pipeline_twice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PipelineRuns, Emulator]]:
    template = migrated_template(tmp_path_factory)
    for emulator in slow_enough_emulator(time_scale=0.5):
        yield run_pipeline(template, tmp_path_factory.mktemp("assets"), emulator, times=2), emulator


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_each_landing_is_one_event_of_one_asset_that_downstream_dags_see(
    pipeline_twice: tuple[PipelineRuns, Emulator],
) -> None:
    runs, emulator = pipeline_twice
    for run in runs.runs:
        assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    manifests = [run.xcoms[FETCH_TASK] for run in runs.runs]
    assert manifests[0]["result_uri"] != manifests[1]["result_uri"]  # a file per run

    assert NO_MODEL not in runs.log
    assert "inactive assets" not in runs.log
    # One asset for both runs, declared when the DAG was parsed.
    assert runs.query("SELECT name, uri FROM asset WHERE name LIKE 'llmbatch-results/%'") == [
        (RESULTS_ASSET.name, RESULTS_ASSET.uri)
    ]
    events = runs.asset_events()
    assert [(e["name"], e["uri"], e["group"]) for e in events] == [
        (RESULTS_ASSET.name, RESULTS_ASSET.uri, RESULTS_ASSET_GROUP)
    ] * 2
    for event, run, manifest in zip(events, runs.runs, manifests, strict=True):
        assert (event["dag_id"], event["task_id"], event["run_id"]) == (PIPELINE, FETCH_TASK, run.run_id)
        assert event["extra"]["result_uri"] == manifest["result_uri"]
        assert event["extra"]["batch_id"] == manifest["batch_id"]
        assert event["extra"]["counts"] == manifest["counts"]
        assert emulator.api_key not in json.dumps(event["extra"])

    # Both consumers are queued for a run, as the scheduler would start it.
    queued = runs.query("SELECT target_dag_id FROM asset_dag_run_queue ORDER BY target_dag_id")
    assert queued == [(CONSUMER_ON_ASSET,), (CONSUMER_ON_NAME,)]
