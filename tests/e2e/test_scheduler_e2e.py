from __future__ import annotations

import time
from pathlib import Path

import pytest
from airflow_cluster import LOOPBACK, AirflowCluster
from airflow_env import REVIEWS_FILE, count_lines, read_jsonl

from airflow_provider_llmbatch.emulator import DEFAULT_API_KEY
from dev.local_airflow import PIPELINE_DAG_ID, LocalAirflow

SENSOR = "wait_for_batch"
BUDGET_SECONDS = 240
FINISHED = {"success", "failed"}


@pytest.mark.e2e
@pytest.mark.airflow
@pytest.mark.timeout(BUDGET_SECONDS + 60)
def test_pipeline_defers_and_resumes_under_a_real_scheduler_and_triggerer(
    airflow_template: LocalAirflow, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    started = time.monotonic()
    airflow = airflow_template.clone(tmp_path / "airflow-home")
    output_dir = tmp_path / "pipeline-output"
    # A batch lasts ~14 s: longer than the scheduler takes to start the sensor, so the sensor defers.
    cluster = AirflowCluster(
        airflow,
        {"LLMBATCH_EXAMPLE_POLL_INTERVAL": "1", "LLMBATCH_OUTPUT_DIR": str(output_dir)},
        emulator_time_scale=10.0,
    )
    reader = airflow.reader()
    sensor_states: list[str | None] = []
    phases: dict[str, float] = {}
    try:
        cluster.start()
        cluster.wait_until(lambda: reader.has_dag(PIPELINE_DAG_ID), 120, "the DAG to be parsed")
        phases["parsed"] = time.monotonic() - started
        cluster.cli("dags", "unpause", PIPELINE_DAG_ID)
        cluster.cli("dags", "trigger", PIPELINE_DAG_ID)
        phases["triggered"] = time.monotonic() - started
        listening: set[str] = set()

        def finished() -> bool:
            latest = reader.latest_run(PIPELINE_DAG_ID)
            if latest is None:
                return False
            state = reader.task_states(PIPELINE_DAG_ID, latest[0]).get(SENSOR)
            if state and (not sensor_states or sensor_states[-1] != state):
                sensor_states.append(state)
                if state == "deferred":
                    listening.update(cluster.listening_addresses())
            return latest[1] in FINISHED

        remaining = BUDGET_SECONDS - (time.monotonic() - started)
        try:
            cluster.wait_until(finished, remaining, "the run to finish")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; sensor states: {sensor_states}\n{cluster.all_logs_tail()}"
            ) from None
        run_id, run_state = reader.latest_run(PIPELINE_DAG_ID) or ("", None)
        tasks = reader.task_states(PIPELINE_DAG_ID, run_id)
        xcoms = reader.return_values(PIPELINE_DAG_ID, run_id)
        phases["finished"] = time.monotonic() - started
        assert run_state == "success", f"{tasks}\n{cluster.all_logs_tail()}"
    finally:
        stopped = cluster.stop()
    wall = time.monotonic() - started
    record_property("wall_seconds", round(wall, 1))
    marks = ", ".join(f"{name} at {seconds:.1f} s" for name, seconds in phases.items())
    print(f"\nend-to-end: {wall:.1f} s wall ({marks}); sensor: {' -> '.join(map(str, sensor_states))}")
    print(f"seconds to stop after SIGTERM (None: killed): {stopped}")

    assert set(tasks.values()) == {"success"}, tasks
    assert "deferred" in sensor_states, sensor_states
    assert sensor_states[-1] == "success"
    # The triggerer ran this batch's trigger and fired its event (it logs next to the task's log).
    batch_id = xcoms["create_batch"]["batch_id"]
    trigger_logs = list(
        airflow.home.glob(f"logs/dag_id={PIPELINE_DAG_ID}/*/task_id={SENSOR}/*.log.trigger.*.log")
    )
    assert trigger_logs, "no trigger log"
    trigger_log = "".join(path.read_text(errors="replace") for path in trigger_logs)
    assert batch_id in trigger_log
    assert "Trigger fired event" in trigger_log
    leaking = [
        path for path in airflow.home.rglob("*.log") if DEFAULT_API_KEY in path.read_text(errors="replace")
    ]
    assert leaking == [], "the API key is in these logs"
    assert listening == {LOOPBACK}, f"listening on {listening}, expected loopback only"
    assert set(stopped) == {"emulator", "api-server", "scheduler", "dag-processor", "triggerer-1"}, stopped

    requests = count_lines(REVIEWS_FILE)
    manifest = xcoms["fetch_results"]
    assert manifest["counts"]["succeeded"] == requests
    rows = read_jsonl(manifest["result_uri"])
    assert len(rows) == requests
    assert {row["status"] for row in rows} == {"succeeded"}
    assert Path(xcoms["summarize"]["summary"]).is_file()
