"""Embed FAQ answers through any OpenAI-compatible Batch API."""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import DAG

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_openai"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

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
    )
    create >> wait >> fetch
