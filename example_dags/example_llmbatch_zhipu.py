"""Classify support tickets with GLM through Zhipu BigModel's Batch API."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_zhipu"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

# Request and results files go under the `storage` param. One machine can keep them in a local folder; when
# workers run on several machines, each task may run on another one: pass {"storage": "s3://bucket/prefix"}
# (the provider's `s3` extra) or gs://... (`gcs`) when triggering, or change the default here.
STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)
RUN_FILES = "{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}"

SYSTEM = "Label the support ticket with one word: billing, delivery, account, bug or other."

TICKETS = [
    ("t-1001", "My order arrived with a cracked screen, I want a replacement."),
    ("t-1002", "How do I change the email address on my account?"),
    ("t-1003", "I was charged twice for the same subscription this month."),
    ("t-1004", "The app crashes every time I open the settings page."),
    ("t-1005", "Can I pick up my order at the store instead of delivery?"),
]

with DAG(
    dag_id="example_llmbatch_zhipu",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried create re-attaches to the batch it already paid for, a fetch rewrites its file.
    default_args={"retries": 3},
    params={
        "storage": Param(STORAGE, type="string", description="Folder or URI for request and results files.")
    },
    tags=["llmbatch", "example", "zhipu"],
    doc_md="""
    ### Zhipu BigModel (GLM) batch

    Sends five support tickets to `glm-4-flash` as one batch, waits for it in the triggerer and
    joins the answers back to the tickets in a results file. Zhipu deletes a batch's input file
    once the batch is done unless told otherwise; this DAG keeps it (`auto_delete_input_file`).
    Connection `llmbatch_zhipu` (type *Zhipu BigModel (GLM)*): API key, base URL optional.
    """,
) as dag:
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        requests=[{"custom_id": ticket_id, "system": SYSTEM, "prompt": text} for ticket_id, text in TICKETS],
        model="glm-4-flash",
        metadata={"purpose": "ticket-triage"},
        vendor_options={"auto_delete_input_file": False},
        request_file_destination=RUN_FILES + "/requests.jsonl",
    )
    wait = BatchSensor(
        deferrable=True,  # wait in the triggerer: no worker slot held for hours
        task_id="wait_for_batch",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        poll_interval=POLL_INTERVAL,
    )
    fetch = FetchBatchResultsOperator(
        task_id="fetch_results",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        # The request file the batch was created from, to join the answers to the questions.
        input_file=create.output["input_uri"],
        destination=RUN_FILES + "/results.jsonl",
    )
    create >> wait >> fetch
