"""Extract product attributes with Qwen through Alibaba DashScope's Batch API."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_dashscope"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

# Request and results files go under the `storage` param. One machine can keep them in a local folder; when
# workers run on several machines, each task may run on another one: pass {"storage": "s3://bucket/prefix"}
# (the provider's `s3` extra) or gs://... (`gcs`) when triggering, or change the default here.
STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)
RUN_FILES = "{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}"

SYSTEM = 'Return JSON {"brand": str, "colour": str, "size": str | null} for the product title.'
TITLES = [
    "Nike Air Zoom Pegasus 40 running shoe, black/white, EU 42",
    "Xiaomi Redmi Note 13 Pro 5G 256GB Midnight Black",
    "IKEA POÄNG armchair, birch veneer, Knisa light beige",
    "Levi's 501 Original Fit jeans, stonewash blue, W32 L34",
    "Anker PowerCore 10000 portable charger, white",
    "Lego Technic 42115 Lamborghini Sián FKP 37",
]

with DAG(
    dag_id="example_llmbatch_dashscope",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried create re-attaches to the batch it already paid for, a fetch rewrites its file.
    default_args={"retries": 3},
    params={
        "storage": Param(STORAGE, type="string", description="Folder or URI for request and results files.")
    },
    tags=["llmbatch", "example", "dashscope"],
    doc_md="""
    ### Alibaba DashScope (Qwen) batch

    Extracts attributes from product titles with `qwen-plus`. DashScope takes `24h` to `336h` as
    the completion window and a display name (`ds_name`) that shows up in the Model Studio console.
    It accepts every batch at first and reports a malformed file as `failed` on the next poll: the
    sensor turns that into a task failure with the vendor's line-level errors.
    Connection `llmbatch_dashscope` (type *Alibaba DashScope (Qwen)*); keys are per region.
    To try the vendor for free, use endpoint `/v1/chat/ds-test` with model `batch-test-model`.
    """,
) as dag:
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        requests=[
            {"custom_id": f"sku-{n:04d}", "system": SYSTEM, "prompt": title}
            for n, title in enumerate(TITLES, start=1)
        ],
        model="qwen-plus",
        completion_window="72h",
        vendor_options={"ds_name": "airflow example: product attributes"},
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
