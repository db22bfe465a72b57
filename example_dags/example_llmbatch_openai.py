"""Embed FAQ answers through any OpenAI-compatible Batch API."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_openai"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

# Request and results files go under the `storage` param. One machine can keep them in a local folder; when
# workers run on several machines, each task may run on another one: pass {"storage": "s3://bucket/prefix"}
# (the provider's `s3` extra) or gs://... (`gcs`) when triggering, or change the default here.
STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)
RUN_FILES = "{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}"

FAQ = {
    "faq-returns": "You can return any item within 30 days of delivery for a full refund.",
    "faq-shipping": "Standard shipping takes 3-5 business days; express takes 1-2.",
    "faq-warranty": "Electronics carry a two-year warranty covering manufacturing defects.",
    "faq-payment": "We accept credit cards, PayPal and bank transfer.",
    "faq-tracking": "A tracking link is emailed as soon as your parcel leaves the warehouse.",
    "faq-gift": "Gift wrapping is available at checkout for a small fee.",
    "faq-account": "You can delete your account at any time from the privacy settings page.",
}

with DAG(
    dag_id="example_llmbatch_openai",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried create re-attaches to the batch it already paid for, a fetch rewrites its file.
    default_args={"retries": 3},
    params={
        "storage": Param(STORAGE, type="string", description="Folder or URI for request and results files.")
    },
    tags=["llmbatch", "example", "openai"],
    doc_md="""
    ### OpenAI-compatible batch: embeddings

    Embeds FAQ answers with `text-embedding-3-small` through the `/v1/embeddings` batch endpoint,
    e.g. to refresh a search index overnight at half the price. Works with OpenAI and with any
    server that speaks the same Batch API (point the connection's base URL at it).
    Connection `llmbatch_openai` (type *OpenAI-compatible*).
    """,
) as dag:
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        requests=[{"custom_id": faq_id, "input": text} for faq_id, text in FAQ.items()],
        model="text-embedding-3-small",
        endpoint="/v1/embeddings",
        completion_window="24h",
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
