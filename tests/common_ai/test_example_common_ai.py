"""The common-ai example DAG, run with ``dag.test()`` in the suite's private Airflow against the emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow_env import EXAMPLE_DAGS, env_for, failing_tail

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from dev.local_airflow import LocalAirflow

DAG_ID = "example_llmbatch_common_ai"
TRIGGER = "airflow.providers.common.ai.triggers.llm_batch.LLMBatchTrigger"
TICKETS = 5


@pytest.fixture(scope="module")
def answering_emulator() -> Iterator[Emulator]:
    # Batches end at once (common-ai polls every 30 s at the least); every ticket gets a valid answer.
    config = EmulatorConfig(time_scale=0.0, replies=((r".", '{"label": "billing", "urgent": true}'),))
    with Emulator(config) as emulator:
        yield emulator


def test_the_example_is_in_the_examples_folder() -> None:
    source = (EXAMPLE_DAGS / f"{DAG_ID}.py").read_text(encoding="utf-8")
    assert 'CONN_ID = "llmbatch_zhipu"' in source
    assert "@task.llm_batch(" in source


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_common_ai_example_runs_against_the_emulator(
    airflow_template: LocalAirflow, answering_emulator: Emulator, tmp_path: Path
) -> None:
    airflow = airflow_template.clone(tmp_path / "airflow-home")
    output = tmp_path / "output"
    [run] = airflow.run_dag_tests(
        [(DAG_ID, {"LLMBATCH_OUTPUT_DIR": str(output)})], env=env_for(answering_emulator), timeout=240
    )

    assert run.succeeded, f"{run.error}\n{failing_tail(run.log_path)}"
    assert run.import_errors == {}
    assert set(run.tasks.values()) == {"success"}, run.tasks
    manifest = run.xcoms["triage_tickets"]
    assert manifest["adapter"] == "zhipu"
    assert manifest["counts"]["succeeded"] == TICKETS
    assert Path(manifest["result_uri"].removeprefix("file://")).is_relative_to(output)
    assert run.xcoms["count_labels"] == {"billing": TICKETS}
    assert answering_emulator.batch("zhipu", manifest["batch_id"])["status"] == "completed"
    assert answering_emulator.stats("zhipu")["batches_created"] == 1
    # It waited in common-ai's trigger, whose stored kwargs carry the batch id and never the key.
    deferrals = airflow.reader().triggers(TRIGGER)
    assert [kwargs and kwargs.get("batch_id") for kwargs in deferrals] == [manifest["batch_id"]]
    assert answering_emulator.api_key not in json.dumps(deferrals)
    assert run.log_path is not None
    assert answering_emulator.api_key not in run.log_path.read_text(errors="replace")
