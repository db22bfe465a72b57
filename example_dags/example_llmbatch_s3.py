"""
Run an LLM batch with every file on S3: the layout for a deployment whose workers run on several machines.

Needs the provider's `s3` extra. `s3://` paths without a connection id use the workers' default AWS
credentials (instance role, environment).
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_zhipu"  # one connection per vendor account: each account keeps its own rate limits
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

with DAG(
    dag_id="example_llmbatch_s3",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried create re-attaches to the batch it already paid for (even when the worker
    # died between the vendor creating it and the answer arriving), a fetch rewrites its file.
    default_args={"retries": 3},
    params={
        "requests": Param(
            "s3://llmbatch-example/requests/reviews.jsonl",
            type="string",
            description="The request file (JSONL, one request per line), written by an upstream job.",
        ),
        "results": Param(
            "s3://llmbatch-example/results",
            type="string",
            description="The folder where each run's results file lands.",
        ),
    },
    tags=["llmbatch", "example", "s3", "zhipu"],
    doc_md="""
    ### Every file on S3: a batch for a distributed deployment

    With the CeleryExecutor or the KubernetesExecutor each task may run on another machine, so no task
    may hand the next one a local path. An upstream job writes the request file to S3;
    **create_batch** streams it from S3 into the vendor's upload (checked on the way), **wait_for_batch**
    waits in whichever triggerer holds it (another one takes over if that one dies, with the same
    wall-clock deadline), and **fetch_results** reads the request file again to join the answers and
    lands one results file per run on S3.
    """,
) as dag:
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        input_file="{{ params.requests }}",
        metadata={"pipeline": "s3-example"},
    )
    wait = BatchSensor(
        deferrable=True,  # wait in the triggerer: no worker slot held for hours
        task_id="wait_for_batch",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        poll_interval=POLL_INTERVAL,
        timeout=timedelta(days=2),
    )
    fetch = FetchBatchResultsOperator(
        task_id="fetch_results",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        input_file=create.output["input_uri"],
        destination="{{ params.results }}/{{ run_id }}.jsonl",
    )
    create >> wait >> fetch
