"""Summarise meeting notes with Kimi through Moonshot's Batch API."""

from __future__ import annotations

import os
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor

CONN_ID = "llmbatch_moonshot"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))

# Request and results files go under the `storage` param. One machine can keep them in a local folder; when
# workers run on several machines, each task may run on another one: pass {"storage": "s3://bucket/prefix"}
# (the provider's `s3` extra) or gs://... (`gcs`) when triggering, or change the default here.
STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)
RUN_FILES = "{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}"

NOTES = {
    "standup-0312": "Backend team: payments migration 80% done, blocked on a schema review. "
    "Frontend: new checkout page in QA. Action: Li Wei to book the review for Thursday.",
    "retro-0314": "What went well: on-call was quiet. What did not: two hotfixes skipped code review. "
    "Decision: no release on Fridays until the pipeline gates are back.",
    "planning-0317": "Next sprint: search relevance, export to CSV, and the accessibility audit fixes. "
    "Capacity is down one engineer; export to CSV may slip.",
    "sync-0318": "Vendor call: the SMS provider raises prices 12% in May. "
    "Options: renegotiate, or move OTP to email for low-risk logins.",
}

with DAG(
    dag_id="example_llmbatch_moonshot",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried create re-attaches to the batch it already paid for, a fetch rewrites its file.
    default_args={"retries": 3},
    params={
        "storage": Param(STORAGE, type="string", description="Folder or URI for request and results files.")
    },
    tags=["llmbatch", "example", "moonshot"],
    doc_md="""
    ### Moonshot (Kimi) batch

    Summarises meeting notes with `moonshot-v1-8k`. Moonshot accepts a completion window from
    `12h` to `7d` and rejects sampling settings (`temperature`, `top_p`, ...) in batch lines, so the
    requests carry only `max_tokens`. Connection `llmbatch_moonshot` (type *Moonshot (Kimi)*);
    keys for api.moonshot.cn and api.moonshot.ai are not interchangeable: pick the region.
    """,
) as dag:
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        requests=[
            {
                "custom_id": note_id,
                "system": "Summarise the meeting notes in two sentences, then list the action items.",
                "prompt": text,
                "params": {"max_tokens": 256},
            }
            for note_id, text in NOTES.items()
        ],
        model="moonshot-v1-8k",
        completion_window="48h",
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
