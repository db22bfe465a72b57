"""
A canary API key never lands anywhere: full DAG runs, passing and failing, then grep everything.

The DAGs run in a real Airflow (``dag.test()`` in a child process, debug logging on, deferrals run in
line) against an emulator that answers a wrong key with a 401 quoting the ``Authorization`` header it
got. Besides the plain key and a wrong one, the key is given as pasted: with whitespace around it (it
works) and with a line break or a zero-width space inside (refused; each half is searched for).
Afterwards every byte Airflow wrote (task logs, the process output, the metadata database with its
XComs, trigger kwargs, rendered templates, task instances, DAG-run conf and log table) and everything
the emulator logged is searched for every key.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow_env import failing_tail, migrated_template

from airflow_provider_llmbatch.emulator import Emulator, EmulatorConfig
from dev.local_airflow import DagTestRun, LocalAirflow

pytestmark = [pytest.mark.airflow, pytest.mark.integration]

CANARY = f"sk-canary-{uuid.uuid4().hex}"
WRONG_CANARY = f"sk-canary-wrong-{uuid.uuid4().hex}"
PADDED = f"\t{CANARY}\r\n"
"""The key as a secret file or a paste brings it: whitespace around it, stripped, and it works."""
UNSENDABLE = {
    "llmbatch_line_break": (uuid.uuid4().hex, "\n", uuid.uuid4().hex),
    "llmbatch_zero_width": (uuid.uuid4().hex, "\u200b", uuid.uuid4().hex),
}
"""Connection -> a key with a character no header carries inside: refused when the connection is read."""
KEYS = {
    "key": CANARY,
    "wrong key": WRONG_CANARY,
    **{f"{conn} key, part {i}": parts[i] for conn, parts in UNSENDABLE.items() for i in (0, 2)},
}
"""What must never be found: the keys, and each half of the unsendable ones (in any escaping)."""

DAGS = textwrap.dedent(
    """
    from __future__ import annotations

    import pendulum
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import DAG

    from airflow_provider_llmbatch.hooks.batch import BatchHook
    from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
    from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
    from airflow_provider_llmbatch.sensors.batch import BatchSensor

    START = pendulum.datetime(2025, 1, 1, tz="UTC")
    REQUESTS = [{"custom_id": f"q-{i}", "prompt": f"question {i}"} for i in range(4)]
    GOOD, BAD = "llmbatch_openai", "llmbatch_wrong"


    def show(password, host):
        # Receives the rendered values; the rendered-fields table must show them masked.
        assert password and host


    def use_hook_directly():
        # A user task that builds the hook itself and lets the vendor's 401 propagate.
        BatchHook(BAD).list_batches().__next__()


    def pipeline(dag_id, conn_id, templated_conn_id):
        # Create (conn_id templated), deferred wait, fetch, and a task templating the connection's password.
        with DAG(dag_id, schedule=None, start_date=START, catchup=False):
            create = CreateBatchOperator(
                task_id="create_batch",
                conn_id=templated_conn_id,
                requests=REQUESTS,
                model="gpt-4o-mini",
                metadata={"run": "{{ run_id }}"},
            )
            wait = BatchSensor(
                task_id="wait_for_batch",
                conn_id=conn_id,
                batch_id=create.output["batch_id"],
                deferrable=True,
                poll_interval=0.3,
            )
            fetch = FetchBatchResultsOperator(
                task_id="fetch_results", conn_id=conn_id, batch_id=create.output["batch_id"],
                input_file=create.output["input_uri"],
            )
            templated = PythonOperator(
                task_id="templated",
                python_callable=show,
                op_kwargs={
                    "password": "{{ conn.%s.password }}" % conn_id,
                    "host": "{{ conn.%s.host }}" % conn_id,
                },
            )
            create >> wait >> fetch >> templated


    pipeline("secrets_success", GOOD, "{{ 'llmbatch_' + 'openai' }}")
    # The key with whitespace around it (a secret file's newline, a pasted tab): stripped, and it works.
    pipeline("secrets_padded_key", "llmbatch_padded", "llmbatch_padded")

    with DAG("secrets_failed_batch", schedule=None, start_date=START, catchup=False):
        CreateBatchOperator(
            task_id="create_and_wait",
            conn_id=GOOD,
            requests=REQUESTS,
            model="gpt-4o-mini",
            metadata={"emulator_outcome": "failed"},
            wait_for_completion=True,
            deferrable=True,
            poll_interval=0.3,
        )

    with DAG("secrets_unsendable_keys", schedule=None, start_date=START, catchup=False):
        for conn in ("llmbatch_line_break", "llmbatch_zero_width"):
            CreateBatchOperator(task_id=f"create_{conn}", conn_id=conn, requests=REQUESTS, model="m")
            BatchSensor(task_id=f"wait_{conn}", conn_id=conn, batch_id="batch_123", deferrable=True)
            FetchBatchResultsOperator(task_id=f"fetch_{conn}", conn_id=conn, batch_id="batch_123")

    with DAG("secrets_wrong_key", schedule=None, start_date=START, catchup=False):
        CreateBatchOperator(task_id="create_batch", conn_id=BAD, requests=REQUESTS, model="gpt-4o-mini")
        BatchSensor(
            task_id="wait_deferred", conn_id=BAD, batch_id="batch_123", deferrable=True, poll_interval=0.3
        )
        BatchSensor(
            task_id="wait_poke", conn_id=BAD, batch_id="batch_123", deferrable=False, poll_interval=0.3,
            timeout=5,
        )
        FetchBatchResultsOperator(task_id="fetch", conn_id=BAD, batch_id="batch_123")
        PythonOperator(task_id="user_hook", python_callable=use_hook_directly)
    """
)


class _Capture(logging.Handler):
    """Keep every record of the emulator's loggers, formatted with its arguments."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.buffer = io.StringIO()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.buffer.write(self.format(record) + "\n")


@pytest.fixture(scope="module")
def emulator_logs() -> Iterator[_Capture]:
    handler = _Capture()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "starlette")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)


@pytest.fixture(scope="module")
def canary_emulator(emulator_logs: _Capture) -> Iterator[Emulator]:
    config = EmulatorConfig(time_scale=0.5, echo_credentials=True)
    with Emulator(config, api_key=CANARY, access_log=True, log_level="debug") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def runs(
    canary_emulator: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LocalAirflow, dict[str, DagTestRun]]:
    airflow_template = migrated_template(tmp_path_factory)
    dags = tmp_path_factory.mktemp("secret-dags")
    (dags / "secrets_dags.py").write_text(DAGS, encoding="utf-8")
    airflow = airflow_template.clone(tmp_path_factory.mktemp("secrets") / "airflow-home", dags)
    env = {
        **canary_emulator.airflow_conn_env("openai", "llmbatch_openai"),
        "AIRFLOW_CONN_LLMBATCH_WRONG": json.dumps(
            {
                "conn_type": "llmbatch_openai",
                "host": canary_emulator.base_url("openai"),
                "password": WRONG_CANARY,
            }
        ),
        # Everything at debug, httpx and httpcore included: headers must not show up even there.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "DEBUG",
    }
    padded = {"llmbatch_padded": PADDED}
    unsendable = {conn: "sk-canary-" + "".join(parts) for conn, parts in UNSENDABLE.items()}
    for conn_id, key in {**padded, **unsendable}.items():
        value = {"conn_type": "llmbatch_openai", "host": canary_emulator.base_url("openai"), "password": key}
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(value)
    plan = [
        "secrets_success",
        "secrets_failed_batch",
        "secrets_padded_key",
        "secrets_unsendable_keys",
        "secrets_wrong_key",
    ]
    results = airflow.run_dag_tests(plan, env=env, timeout=240)
    return airflow, {run.dag_id: run for run in results}


# Upstream, not this provider: under ``dag.test()`` Airflow's in-process supervisor logs every message a
# task sends it at debug level, including the MaskSecret messages that register a secret for masking
# (Airflow sends one itself when a task reads a connection). A real supervisor logs "(body omitted)".
# Only this exact line is tolerated; the key anywhere else fails.
_UPSTREAM_DEBUG = re.compile(
    rb"\[debug +\] Sending request +loc=supervisor\.py:\d+ "
    rb"msg=MaskSecret\(value='(?P<key>[^']*)', name=None, type='MaskSecret'\)"
)


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if needle in _UPSTREAM_DEBUG.sub(b"<upstream MaskSecret debug line>", data):
            hits.append(str(path.relative_to(root)))
    return hits


def _table_text(db: Path, table: str) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        names = {row[0] for row in conn.execute("select name from sqlite_master where type='table'")}
        if table not in names:
            return ""
        rows = conn.execute(f"select * from {table}").fetchall()
    return "\n".join(repr(row) for row in rows)


def test_runs_happened_as_planned(runs: tuple[LocalAirflow, dict[str, DagTestRun]]) -> None:
    _, by_dag = runs
    success = by_dag["secrets_success"]
    assert success.succeeded, f"{success.error}\n{failing_tail(success.log_path)}"
    assert success.deferrals, "the sensor deferred, so trigger kwargs were written"
    assert by_dag["secrets_failed_batch"].state == "failed"
    assert by_dag["secrets_failed_batch"].tasks == {"create_and_wait": "failed"}
    wrong = by_dag["secrets_wrong_key"]
    assert wrong.state == "failed"
    assert set(wrong.tasks.values()) == {"failed"}, wrong.tasks
    padded = by_dag["secrets_padded_key"]
    assert padded.succeeded, f"the padded key works: {padded.error}\n{failing_tail(padded.log_path)}"
    assert padded.deferrals, "its sensor deferred"
    unsendable = by_dag["secrets_unsendable_keys"]
    assert unsendable.state == "failed"
    assert set(unsendable.tasks.values()) == {"failed"}, unsendable.tasks
    assert len(unsendable.tasks) == 6


def test_unsendable_keys_were_refused_naming_the_field(
    runs: tuple[LocalAirflow, dict[str, DagTestRun]],
) -> None:
    _, by_dag = runs
    log_path = by_dag["secrets_unsendable_keys"].log_path
    assert log_path is not None
    log = log_path.read_text(errors="replace")
    assert (
        log.count("password (API key): expected printable ASCII only, got a control or space character") >= 3
    )
    assert log.count("password (API key): expected printable ASCII only, got a non-ASCII character") >= 3


def test_the_echoing_emulator_did_echo(canary_emulator: Emulator) -> None:
    # The check below is only meaningful if a wrong key really comes back in the vendor's body.
    import httpx

    response = httpx.get(
        f"{canary_emulator.base_url('openai')}/batches", headers={"Authorization": "Bearer sk-probe-1"}
    )
    assert response.status_code == 401
    assert "sk-probe-1" in response.text


@pytest.mark.parametrize("which", sorted(KEYS))
def test_no_file_airflow_wrote_holds_the_key(
    which: str, runs: tuple[LocalAirflow, dict[str, DagTestRun]]
) -> None:
    airflow, by_dag = runs
    key = KEYS[which]
    assert _files_holding(airflow.home, key.encode()) == []
    # The search can find things: the batch id is in the process output and the database.
    batch_id = by_dag["secrets_success"].xcoms["create_batch"]["batch_id"]
    assert _files_holding(airflow.home, batch_id.encode()), "the grep works"
    for run in by_dag.values():
        assert key not in (run.error or "")
        assert key not in json.dumps(run.deferrals, default=str)
        assert key not in json.dumps(run.xcoms, default=str)


@pytest.mark.parametrize(
    "table",
    [
        "xcom",
        "trigger",
        "rendered_task_instance_fields",
        "task_instance",
        "dag_run",
        "log",
        "task_instance_note",
    ],
)
def test_no_metadata_table_holds_the_key(
    table: str, runs: tuple[LocalAirflow, dict[str, DagTestRun]]
) -> None:
    airflow, _ = runs
    text = _table_text(airflow.db_path, table)
    for key in KEYS.values():
        assert key not in text, f"the API key is in table {table}"


def test_rendered_templates_are_masked(runs: tuple[LocalAirflow, dict[str, DagTestRun]]) -> None:
    airflow, _ = runs
    text = _table_text(airflow.db_path, "rendered_task_instance_fields")
    assert "llmbatch_openai" in text, "the templated conn_id was rendered and stored"
    assert "***" in text, "the templated password was rendered, and masked"


def test_vendor_errors_reached_the_logs_redacted(runs: tuple[LocalAirflow, dict[str, DagTestRun]]) -> None:
    _, by_dag = runs
    log_path = by_dag["secrets_wrong_key"].log_path
    assert log_path is not None
    log = log_path.read_text(errors="replace")
    assert "AuthenticationError" in log
    assert "got Authorization: ***" in log or "Bearer ***" in log, (
        "the echoed header reached the log redacted"
    )
    assert "BatchFailedError" in log
    assert "httpcore" in log or "httpx" in log, "debug logging of the HTTP clients was on"


def test_emulator_logs_hold_no_key(
    emulator_logs: _Capture, runs: tuple[LocalAirflow, dict[str, Any]]
) -> None:
    text = emulator_logs.buffer.getvalue()
    assert "/batches" in text, "the access log was captured"
    for key in KEYS.values():
        assert key not in text
