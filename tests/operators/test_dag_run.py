"""
The operators in a real Airflow: ``dag.test()`` in a fresh process with its own AIRFLOW_HOME.

A crash of the create task after the batch exists (before its id reaches XCom) is retried by Airflow;
the retry must re-attach through the task state store, and the results must land with an asset event.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_provider_llmbatch.emulator import Emulator

REPO = Path(__file__).resolve().parents[2]

DAG_FILE = textwrap.dedent(
    """
    from __future__ import annotations

    from datetime import datetime, timedelta

    from airflow.sdk import DAG

    import airflow_provider_llmbatch.operators.batch as create_module
    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
    from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator

    _push = create_module._push


    def _crash_on_first_try(context, key, value):
        if key == "batch_id" and context["ti"].try_number == 1:
            raise RuntimeError("simulated crash after the batch was created")
        _push(context, key, value)


    create_module._push = _crash_on_first_try

    START = datetime(2026, 1, 1)

    with DAG("llmbatch_operators_probe", schedule=None, start_date=START, catchup=False) as dag:
        create = CreateBatchOperator(
            task_id="create",
            conn_id="llmbatch_probe",
            requests=[{"custom_id": f"r{i}", "prompt": f"hello {i}"} for i in range(3)]
            + [{"custom_id": "fail-1", "prompt": "this one fails"}],
            model="test-model",
            wait_for_completion=True,
            deferrable=True,
            poll_interval=0.2,
            max_poll_interval=0.5,
            max_failed_fraction=0.5,
            retries=1,
            retry_delay=timedelta(0),
        )
        fetch = FetchBatchResultsOperator(
            task_id="fetch",
            conn_id="llmbatch_probe",
            batch_id="{{ ti.xcom_pull(task_ids='create', key='batch_id') }}",
            input_file="{{ ti.xcom_pull(task_ids='create')['input_uri'] }}",
        )
        create >> fetch
    """
)

RUNNER = textwrap.dedent(
    """
    import json, os, sqlite3, subprocess, sys
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    sys.path.insert(0, sys.argv[1])
    from probe_dag import dag
    run = dag.test()
    tis = {ti.task_id: [ti.state, ti.try_number] for ti in run.get_task_instances()}
    db = sqlite3.connect(os.path.join(os.environ["AIRFLOW_HOME"], "airflow.db"))
    query = "select value from xcom where task_id = 'fetch' and key = 'return_value'"
    manifest = json.loads(db.execute(query).fetchone()[0])
    print("RESULT " + json.dumps({"state": run.state, "tis": tis, "manifest": manifest}))
    """
)


@pytest.mark.airflow
@pytest.mark.integration
def test_crash_retry_reattaches_and_results_land(emulator: Emulator, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "probe_dag.py").write_text(DAG_FILE)
    home = tmp_path / "home"
    env = {
        **os.environ,
        **emulator.airflow_conn_env("zhipu", "llmbatch_probe"),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)

    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(dags)], env=env, capture_output=True, text=True, timeout=240
    )

    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["state"] == "success", result
    assert result["tis"]["create"] == ["success", 2]
    stats = emulator.stats("zhipu")
    assert (stats["files_uploaded"], stats["batches_created"]) == (1, 1)
    # Neither try listed batches: the first found the task state store empty (no earlier try), the
    # retry read its batch id from the store.
    assert "list_batches" not in stats["operations"]
    manifest = result["manifest"]
    assert manifest["counts"] == {
        "succeeded": 3,
        "failed": 1,
        "expired": 0,
        "cancelled": 0,
        "missing": 0,
        "total": 4,
    }
    landed = Path(manifest["result_uri"].removeprefix("file://"))
    assert landed.is_relative_to(home / "llmbatch-results" / "llmbatch_operators_probe")
    assert [json.loads(line)["custom_id"] for line in landed.read_text().splitlines()] == [
        "r0",
        "r1",
        "r2",
        "fail-1",
    ]
    assert "simulated crash" in proc.stdout + proc.stderr
