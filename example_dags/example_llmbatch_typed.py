"""
Typed review labels in one task: ``@task.llmbatch`` with a pydantic output schema, a budget, Parquet out.

The reviews pipeline of ``example_llmbatch_pipeline`` as one TaskFlow task: the function returns one
record per review; the task checks them, estimates the job's input tokens and cost (refusing it above
``max_input_tokens`` or ``max_cost``), uploads, creates the batch, defers until it ends, fetches, validates
each answer against ``Review`` and lands the rows as a Parquet file whose columns are ``Review``'s fields.
A downstream task reads the Parquet file and aggregates it. Answers that do not parse or validate land as
``invalid_output`` rows with the reason in ``error``; ``invalid_output_fails=False`` keeps them from
failing the run (they are counted in the manifest either way).

The connection is ``llmbatch_zhipu``; the prices below are an example table in the shape the provider
reads (put your contract's batch prices there, or in the connection extra ``prices``).
"""

# No ``from __future__ import annotations``: pydantic resolves Review's annotations when the DAG file is
# loaded by path, where the module's names are not importable by name.
import json
import os
from pathlib import Path
from typing import Any, Literal

import pendulum
from airflow.sdk import DAG, task
from pydantic import BaseModel

CONN_ID = "llmbatch_zhipu"
MODEL = "glm-4-flash"
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))
REVIEWS = Path(__file__).parent / "data" / "reviews.jsonl"
PRICES = {
    "currency": "CNY",
    "models": {MODEL: {"input_per_million": 0.05, "output_per_million": 0.05}},
}
MAX_INPUT_TOKENS = 20_000
MAX_COST = 0.5
"""In ``PRICES``' currency."""


class Review(BaseModel):
    """What the model answers for one review."""

    sentiment: Literal["positive", "negative", "neutral", "mixed"]
    score: int
    summary: str


SYSTEM = "Label the customer review: its sentiment, a score from 1 (worst) to 5 (best), a one-line summary."


with DAG(
    dag_id="example_llmbatch_typed",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    # Safe to retry: a retry re-attaches to the batch the task already paid for.
    default_args={"retries": 2},
    tags=["llmbatch", "example", "taskflow", "parquet"],
) as dag:

    @task.llmbatch(
        conn_id=CONN_ID,
        model=MODEL,
        output_schema=Review,
        invalid_output_fails=False,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_cost=MAX_COST,
        prices=PRICES,
        format="parquet",
        deferrable=True,
        poll_interval=POLL_INTERVAL,
    )
    def label_reviews() -> list[dict[str, Any]]:
        """Return one request record per review."""
        with REVIEWS.open(encoding="utf-8") as handle:
            reviews = [json.loads(line) for line in handle if line.strip()]
        return [{"custom_id": r["review_id"], "system": SYSTEM, "prompt": r["text"]} for r in reviews]

    @task
    def aggregate(manifest: dict[str, Any]) -> dict[str, Any]:
        """Read the Parquet results: sentiment counts, mean score, invalid answers, tokens."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(manifest["result_uri"].removeprefix("file://"))
        valid = table.filter(pc.equal(table["status"], "succeeded"))
        sentiments = valid["sentiment"].to_pylist()
        return {
            "rows": table.num_rows,
            "valid": valid.num_rows,
            "invalid_output": table.filter(pc.equal(table["status"], "invalid_output")).num_rows,
            "sentiment": {label: sentiments.count(label) for label in sorted(set(sentiments))},
            "mean_score": pc.mean(valid["score"]).as_py(),
            "prompt_tokens": pc.sum(table["prompt_tokens"]).as_py(),
            "estimated_input_tokens": manifest["estimate"]["input_tokens"],
            "cost": manifest.get("cost"),
        }

    aggregate(label_reviews())
