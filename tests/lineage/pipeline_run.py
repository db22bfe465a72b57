"""
The example pipeline in a private Airflow, next to DAGs scheduled on its results asset.

The DAGs folder links the example pipeline (and its data) and adds two consumers: one scheduled on the
results asset itself, one on a reference to its name. Both are unpaused at creation, so an asset event
of the pipeline's fetch queues a run of each (``asset_dag_run_queue``), as it would for a scheduler.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_env import EXAMPLE_DAGS, env_for

from airflow_provider_llmbatch.assets import results_asset
from airflow_provider_llmbatch.emulator import Emulator
from dev.local_airflow import DagTestRun, LocalAirflow

PIPELINE = "example_llmbatch_pipeline"
FETCH_TASK = "fetch_results"
CONSUMER_ON_ASSET = "llmbatch_results_consumer"
CONSUMER_ON_NAME = "llmbatch_results_consumer_by_name"
RESULTS_ASSET = results_asset(PIPELINE, FETCH_TASK)

CONSUMERS = textwrap.dedent(
    f"""
    from __future__ import annotations

    import pendulum
    from airflow.sdk import DAG, Asset, task

    from airflow_provider_llmbatch.assets import results_asset

    START = pendulum.datetime(2025, 1, 1, tz="UTC")


    RESULTS = results_asset("{PIPELINE}", "{FETCH_TASK}")


    @task
    def read_results(**context):
        return [event.extra["result_uri"] for event in context["triggering_asset_events"][RESULTS]]


    with DAG("{CONSUMER_ON_ASSET}", schedule=RESULTS, start_date=START):
        read_results()

    with DAG("{CONSUMER_ON_NAME}", schedule=Asset.ref(name=RESULTS.name), start_date=START):
        read_results()
    """
)


@dataclass(frozen=True)
class PipelineRuns:
    """The pipeline's runs, the Airflow they ran in and the process's output."""

    airflow: LocalAirflow
    runs: list[DagTestRun]

    @property
    def log(self) -> str:
        """Return everything the process running the DAGs wrote."""
        path = self.runs[0].log_path
        return path.read_text(errors="replace") if path else ""

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Run a read-only query on the metadata database."""
        con = sqlite3.connect(f"{self.airflow.db_path.as_uri()}?mode=ro", uri=True)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def asset_events(self) -> list[dict[str, Any]]:
        """Return every asset event, oldest first, with its asset's name, URI and group."""
        rows = self.query(
            'SELECT a.name, a.uri, a."group", e.extra, e.source_dag_id, e.source_task_id, e.source_run_id'
            " FROM asset_event e JOIN asset a ON a.id = e.asset_id ORDER BY e.id"
        )
        keys = ("name", "uri", "group", "extra", "dag_id", "task_id", "run_id")
        events = [dict(zip(keys, row, strict=True)) for row in rows]
        for event in events:
            event["extra"] = json.loads(event["extra"]) if isinstance(event["extra"], str) else event["extra"]
        return events


def run_pipeline(
    template: LocalAirflow,
    home: Path,
    emulator: Emulator,
    *,
    times: int = 1,
    env: Mapping[str, str] | None = None,
) -> PipelineRuns:
    """Run the example pipeline ``times`` times with ``dag.test()``, beside the consumers; return the runs."""
    dags = home / "dags"
    dags.mkdir(parents=True)
    (dags / f"{PIPELINE}.py").symlink_to(EXAMPLE_DAGS / f"{PIPELINE}.py")
    (dags / "data").symlink_to(EXAMPLE_DAGS / "data", target_is_directory=True)
    (dags / "llmbatch_results_consumers.py").write_text(CONSUMERS, encoding="utf-8")
    airflow = template.clone(home / "airflow-home", dags)
    plan: Sequence[tuple[str, Mapping[str, str]]] = [
        (PIPELINE, {"LLMBATCH_OUTPUT_DIR": str(home / "output")}) for _ in range(times)
    ]
    extra = {"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", **(env or {})}
    runs = airflow.run_dag_tests(plan, env=env_for(emulator, extra), timeout=90 + 60 * times)
    return PipelineRuns(airflow, runs)
