"""Triage support tickets with GLM on Zhipu's Batch API through common-ai's ``@task.llm_batch``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import pendulum
from airflow.sdk import DAG, ObjectStoragePath, Param, task
from pydantic import BaseModel

CONN_ID = "llmbatch_zhipu"
# common-ai polls a batch at most every 30 seconds.
POLL_INTERVAL = max(30, int(float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))))

# Results go under the `storage` param: a local folder on one machine, or s3://... / gs://... (the
# provider's `s3` and `gcs` extras) when workers run on several machines. A retry or a clear of the task
# finds its batch through the state common-ai keeps there, so the path must not change between tries.
STORAGE = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch"
)

TICKETS = [
    "My order arrived with a cracked screen, I want a replacement.",
    "How do I change the email address on my account?",
    "I was charged twice for the same subscription this month.",
    "The app crashes every time I open the settings page.",
    "Can I pick up my order at the store instead of delivery?",
]


class Triage(BaseModel):
    """The answer every request asks for; Zhipu gets it in JSON mode, with this schema in the prompt."""

    label: Literal["billing", "delivery", "account", "bug", "other"]
    urgent: bool


with DAG(
    dag_id="example_llmbatch_common_ai",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retried or cleared task re-attaches to the batch it already paid for.
    default_args={"retries": 3},
    params={"storage": Param(STORAGE, type="string", description="Folder or URI for the results.")},
    tags=["llmbatch", "example", "zhipu", "common-ai"],
    doc_md="""
    ### `@task.llm_batch` on Zhipu BigModel (GLM)

    Airflow's AI provider (`apache-airflow-providers-common-ai`) submits five tickets as one batch
    through this provider's Zhipu adapter (`model_id="zhipu:..."`), waits in the triggerer and lands
    one validated row per ticket as JSONL under the `storage` param. Connection `llmbatch_zhipu`
    (type *Zhipu BigModel (GLM)*): API key, base URL optional.
    """,
) as dag:

    @task.llm_batch(
        llm_conn_id=CONN_ID,
        model_id="zhipu:glm-4-flash",
        result_path="{{ params.storage }}/{{ dag.dag_id }}/{{ run_id }}",
        system_prompt="Triage the support ticket.",
        output_type=Triage,
        max_tokens=200,
        deferrable=True,  # wait in the triggerer: no worker slot held for hours
        poll_interval=POLL_INTERVAL,
    )
    def triage_tickets() -> list[str]:
        return TICKETS

    @task
    def count_labels(manifest: dict) -> dict[str, int]:
        """Read the landed rows back: the XCom value is only the manifest."""
        text = ObjectStoragePath(manifest["result_uri"]).read_text()
        counts: dict[str, int] = {}
        for row in map(json.loads, text.splitlines()):
            label = row["output"]["label"] if row["status"] == "success" else row["status"]
            counts[label] = counts.get(label, 0) + 1
        return counts

    count_labels(triage_tickets())
