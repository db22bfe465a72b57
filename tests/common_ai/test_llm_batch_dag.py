"""
A real common-ai ``@task.llm_batch`` DAG under ``dag.test()``, on each vendor, against the emulator.

One task waits for its batch in common-ai's trigger; the other dies on its first try right after the
batch was created, before common-ai recorded the batch id, so its retry must find the batch through the
adapter's orphan look-up. The DAG run is then cleared (``dag.test()`` again for the same logical date):
every task re-attaches to the batch it has, and the emulator counts no second batch or upload.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow_env import failing_tail

from airflow_provider_llmbatch.common_ai import ADAPTERS
from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from dev.local_airflow import LocalAirflow

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

CONN_ID = "ai_batch_conn"
TRIGGER = "airflow.providers.common.ai.triggers.llm_batch.LLMBatchTrigger"
ANSWER = '{"label": "billing", "urgent": false}'
PROMPTS = ["I was charged twice.", "Where is my parcel?", "The app crashes on start."]

DAG_FILE = textwrap.dedent(
    """
    from __future__ import annotations

    import json
    from datetime import datetime, timedelta
    from typing import Literal

    from airflow.providers.common.ai.batch import state
    from airflow.sdk import DAG, ObjectStoragePath, get_current_context, task
    from pydantic import BaseModel

    # The first try of "orphaned" dies right after the batch was created, before common-ai records its
    # id: the next try has only the intent record and must find the batch at the vendor.
    _write_submitted = getattr(state, "_probe_original", state.write_submitted)
    state._probe_original = _write_submitted


    def _crash_once(*args, **kwargs):
        ti = get_current_context()["ti"]
        if ti.task_id == "orphaned" and ti.try_number == 1:
            raise RuntimeError("simulated crash between submit and recording the batch id")
        return _write_submitted(*args, **kwargs)


    state.write_submitted = _crash_once


    class Ticket(BaseModel):
        label: Literal["billing", "delivery", "bug"]
        urgent: bool


    with DAG("ai_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        common = dict(
            llm_conn_id="{conn_id}",
            model_id="{prefix}:test-model",
            system_prompt="Triage the support ticket.",
            deferrable=True,
            poll_interval=30,
            retries=1,
            retry_delay=timedelta(0),
        )

        @task.llm_batch(result_path="{results}/{{{{ run_id }}}}/waited", output_type=Ticket, **common)
        def waited():
            return {prompts!r}

        @task.llm_batch(result_path="{results}/{{{{ run_id }}}}/orphaned", **common)
        def orphaned():
            return {prompts!r}

        @task
        def landed(manifest):
            text = ObjectStoragePath(manifest["result_uri"]).read_text()
            rows = [json.loads(line) for line in text.splitlines()]
            statuses = sorted(row["status"] for row in rows)
            return {{"statuses": statuses, "outputs": [row["output"] for row in rows]}}

        landed.override(task_id="landed_waited")(waited())
        landed.override(task_id="landed_orphaned")(orphaned())
    """
)

RUNNER = textwrap.dedent(
    """
    import json, os, sqlite3, sys
    from datetime import datetime, timezone

    sys.path.insert(0, sys.argv[1])
    from probe_dag import dag

    db = sqlite3.connect(os.path.join(os.environ["AIRFLOW_HOME"], "airflow.db"))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for attempt in ("first", "cleared"):
        # The same run id both times: the second run is the first one cleared (dag.test() replaces it).
        run = dag.test(logical_date=start, run_after=start)
        tis = {ti.task_id: [ti.state, ti.try_number] for ti in run.get_task_instances()}
        rows = db.execute(
            "select task_id, value from xcom where run_id = ? and key = 'return_value'", (run.run_id,)
        ).fetchall()
        xcoms = {task_id: json.loads(value) for task_id, value in rows}
        print("RESULT " + json.dumps({"attempt": attempt, "state": run.state, "tis": tis, "xcoms": xcoms}))
    """
)


@pytest.fixture(scope="module")
def dag_emulator() -> Iterator[Emulator]:
    # Batches end at once: common-ai polls every 30 s at the least, and its first poll finds them done.
    with Emulator(EmulatorConfig(time_scale=0.0, replies=((r".", ANSWER),))) as emulator:
        yield emulator


@pytest.mark.timeout(300)
@pytest.mark.parametrize("vendor", ["zhipu", "moonshot", "dashscope"])
def test_llm_batch_runs_reattaches_and_lands_on_the_vendor(
    vendor: str, dag_emulator: Emulator, airflow_template: LocalAirflow, tmp_path: Path
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    results = tmp_path / "results"
    source = DAG_FILE.format(
        conn_id=CONN_ID, prefix=ADAPTERS[vendor].name, results=f"file://{results}", prompts=PROMPTS
    )
    (dags / "probe_dag.py").write_text(source)
    airflow = airflow_template.clone(tmp_path / "home", dags)
    env = airflow.env(dag_emulator.airflow_conn_env(vendor, CONN_ID))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, "-c", RUNNER, str(dags)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=240,
            check=False,
        )
    output = log.read_text(errors="replace")
    results_lines = [
        line.removeprefix("RESULT ") for line in output.splitlines() if line.startswith("RESULT ")
    ]
    runs: dict[str, dict[str, Any]] = {r["attempt"]: r for r in map(json.loads, results_lines)}
    assert set(runs) == {"first", "cleared"}, failing_tail(log)
    first, cleared = runs["first"], runs["cleared"]

    assert first["state"] == "success", failing_tail(log)
    assert first["tis"]["waited"] == ["success", 1]
    assert first["tis"]["orphaned"] == ["success", 2]
    assert "simulated crash" in output
    for task_id, structured in (("waited", True), ("orphaned", False)):
        manifest = first["xcoms"][task_id]
        assert manifest["adapter"] == ADAPTERS[vendor].name
        assert manifest["counts"]["succeeded"] == len(PROMPTS)
        assert manifest["structured"] is structured
        assert Path(manifest["result_uri"].removeprefix("file://")).is_relative_to(results)
        landed = first["xcoms"][f"landed_{task_id}"]
        assert landed["statuses"] == ["success"] * len(PROMPTS)
        expected = json.loads(ANSWER) if structured else ANSWER
        assert landed["outputs"] == [expected] * len(PROMPTS)
    batch_ids = {task_id: first["xcoms"][task_id]["batch_id"] for task_id in ("waited", "orphaned")}
    assert all(dag_emulator.batch(vendor, b)["status"] == "completed" for b in batch_ids.values())

    # "waited" deferred to common-ai's trigger, which carries the batch id and never the key.
    deferrals = airflow.reader().triggers(TRIGGER)
    deferred = [kwargs and kwargs.get("batch_id") for kwargs in deferrals]
    assert batch_ids["waited"] in deferred
    assert set(deferred) <= set(batch_ids.values())
    assert dag_emulator.api_key not in json.dumps(deferrals)
    assert dag_emulator.api_key not in output

    # Cleared: both tasks re-attach to their batches and land the same rows again.
    assert cleared["state"] == "success", failing_tail(log)
    assert cleared["tis"]["orphaned"] == ["success", 1]
    # The retry of the first run found the orphan through the adapter; the cleared run read its record.
    assert output.count("Recovered orphaned batch") == 1
    assert {t: cleared["xcoms"][t]["batch_id"] for t in batch_ids} == batch_ids
    assert cleared["xcoms"]["landed_waited"] == first["xcoms"]["landed_waited"]
    stats = dag_emulator.stats(vendor)
    assert (stats["batches_created"], stats["files_uploaded"]) == (2, 2)
