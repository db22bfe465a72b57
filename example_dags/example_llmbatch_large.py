"""A large job: 120,000 requests in several batches, waited for in one deferral, failed rows resubmitted."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_openai"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))
RECORDS = int(os.environ.get("LLMBATCH_EXAMPLE_LARGE_RECORDS", "120000"))
RETRY_EVERY = 25
"""One request in this many is named ``retry-...``: the bundled emulator rate limits those once."""

STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)
RUN_FILES = "{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}"

with DAG(
    dag_id="example_llmbatch_large",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 3},
    params={
        "storage": Param(STORAGE, type="string", description="Folder or URI for request and results files.")
    },
    tags=["llmbatch", "example", "large"],
    doc_md="""
    ### One task for any size

    120,000 product titles to classify: more than one file's worth for any vendor (OpenAI-compatible APIs
    take 50,000 requests per file). `CreateBatchOperator` checks the input as one file and splits it into
    parts within the vendor's limits (three batches here), each retry-safe on its own. `BatchSensor` waits
    for all of them in one deferral. `FetchBatchResultsOperator` lands one results file in input order and
    resubmits, once, the rows that failed for a reason that may not last (rate limited, server errors,
    never run); their rows show `attempts: 2`. Against the bundled emulator, every 25th request is rate
    limited the first time.
    """,
) as dag:

    @task
    def write_requests(params: dict[str, str], run_id: str) -> str:
        """Write the requests where the create task reads them (streamed, one line at a time)."""
        from airflow_provider_llmbatch.jsonl import build_request_file

        destination = f"{params['storage']}/example_llmbatch_large/{run_id}/requests.jsonl"
        records = (
            {
                "custom_id": f"retry-{i}" if i % RETRY_EVERY == 0 else f"title-{i}",
                "prompt": f"Classify the product title 'item number {i}' into one category.",
            }
            for i in range(RECORDS)
        )
        # whole_input: the create task splits this one file into parts within the vendor's per-file limits.
        build_request_file(
            records, destination, "openai", model="gpt-4o-mini", params={"max_tokens": 16}, whole_input=True
        )
        return destination

    requests = write_requests()
    create = CreateBatchOperator(task_id="create_batches", conn_id=CONN_ID, input_file=requests)
    wait = BatchSensor(
        deferrable=True,
        task_id="wait_for_batches",
        conn_id=CONN_ID,
        batch_id=create.output["batch_ids"],
        poll_interval=POLL_INTERVAL,
        # Rate limited rows are resubmitted below: the first round may fail up to one in 25, and a part
        # the vendor expired or cancelled is run again there too.
        max_failed_fraction=1 / RETRY_EVERY,
        expect_resubmission=True,
    )
    fetch = FetchBatchResultsOperator(
        task_id="fetch_results",
        conn_id=CONN_ID,
        batch_id=create.output["batch_ids"],
        input_file=create.output["input_uri"],
        destination=RUN_FILES + "/results.jsonl",
        resubmit_failed=1,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
    )
    create >> wait >> fetch
