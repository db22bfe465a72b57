"""
Classify product reviews in one LLM batch: records file -> requests -> batch -> results -> summary.

The vendor comes from ``LLMBATCH_PIPELINE_VENDOR`` (default ``zhipu``) and the connection is
``llmbatch_<vendor>``; the model from ``LLMBATCH_PIPELINE_MODEL`` (default: one per vendor below).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, ObjectStoragePath, Param, task

from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.sensors.batch import BatchSensor
from airflow_provider_llmbatch.vendors import REGISTRY

VENDOR = os.environ.get("LLMBATCH_PIPELINE_VENDOR", "zhipu")
if VENDOR not in REGISTRY:
    raise ValueError(f"LLMBATCH_PIPELINE_VENDOR must be one of {sorted(REGISTRY)}, got {VENDOR!r}")
CONN_ID = f"llmbatch_{VENDOR}"
DEFAULT_MODELS = {
    "zhipu": "glm-4-flash",
    "moonshot": "moonshot-v1-8k",
    "dashscope": "qwen-plus",
    "openai": "gpt-4o-mini",
}
MODEL = os.environ.get("LLMBATCH_PIPELINE_MODEL") or DEFAULT_MODELS.get(VENDOR, "")
POLL_INTERVAL = float(os.environ.get("LLMBATCH_EXAMPLE_POLL_INTERVAL", "60"))
OUTPUT_DIR = os.environ.get("LLMBATCH_OUTPUT_DIR") or str(
    Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "llmbatch-pipeline"
)

LABELS = ("positive", "negative", "neutral", "mixed")
SYSTEM = (
    "You label customer product reviews. Reply with JSON only: "
    '{"sentiment": "positive" | "negative" | "neutral" | "mixed", "issue": <short phrase or null>}.'
)


def _read_jsonl(location: str) -> Iterator[dict[str, Any]]:
    with ObjectStoragePath(location).open("r", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def _sentiment(content: Any) -> str | None:
    """Return the label a model answered, or None if the answer does not contain one."""
    if not isinstance(content, str):
        return None
    text = content.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        answer = json.loads(text)
    except ValueError:
        # Models sometimes answer with the bare word instead of the JSON asked for.
        word = re.match(r"\W*(\w+)", text)
        label = word.group(1).lower() if word else None
    else:
        label = str(answer.get("sentiment", "")).lower() if isinstance(answer, dict) else None
    return label if label in LABELS else None


with DAG(
    dag_id="example_llmbatch_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # Safe to retry: a retried create re-attaches to the batch it already paid for, a fetch rewrites its file.
    default_args={"retries": 3},
    tags=["llmbatch", "example", "pipeline", VENDOR],
    params={
        "records": Param(
            str(Path(__file__).parent / "data" / "reviews.jsonl"),
            type="string",
            description="The reviews to classify: a JSONL path or URI with review_id, product, text.",
        ),
        # With workers on several machines, every task must reach these: s3://... or gs://... then.
        "output_dir": Param(
            OUTPUT_DIR, type="string", description="Where requests, results and the summary are written."
        ),
    },
    doc_md=f"""
    ### Review sentiment, half price: an LLM batch ETL pipeline

    1. **prepare_requests** streams the review records into a request file (one chat request per
       review, validated against the vendor's rules as it is written);
    2. **create_batch** uploads it and creates the batch (a retry re-attaches to the same batch);
    3. **wait_for_batch** waits in the triggerer, costing no worker slot for the hours a batch takes;
    4. **fetch_results** joins outputs and errors back to the requests in one results file;
    5. **summarize** streams the results and writes sentiment counts per product.

    Vendor: `{VENDOR}` (env `LLMBATCH_PIPELINE_VENDOR`), connection `{CONN_ID}`, model `{MODEL}`.
    """,
) as dag:

    @task
    def prepare_requests(**context: Any) -> dict[str, Any]:
        """Write one chat request per review and return where this run's files go."""
        from airflow_provider_llmbatch.hooks.batch import BatchHook
        from airflow_provider_llmbatch.jsonl import build_request_file

        params = context["params"]
        run_dir = ObjectStoragePath(params["output_dir"]) / re.sub(r"[^\w.-]+", "_", context["run_id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        requests = run_dir / "requests.jsonl"
        records = (
            {"custom_id": review["review_id"], "prompt": review["text"]}
            for review in _read_jsonl(params["records"])
        )
        report = build_request_file(
            records,
            requests,
            BatchHook(llmbatch_conn_id=CONN_ID).vendor,
            model=MODEL,
            system=SYSTEM,
            params={"max_tokens": 64},
        )
        return {
            "requests": str(requests),
            "results": str(run_dir / "results.jsonl"),
            "summary": str(run_dir / "summary.json"),
            "count": report.lines,
        }

    @task
    def summarize(manifest: dict[str, Any], files: dict[str, Any], **context: Any) -> dict[str, Any]:
        """Count sentiments per product from the results file and write the summary next to it."""
        records = context["params"]["records"]
        product_of = {review["review_id"]: review["product"] for review in _read_jsonl(records)}
        statuses: Counter[str] = Counter()
        sentiments: Counter[str] = Counter()
        by_product: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for row in _read_jsonl(manifest["result_uri"]):
            statuses[row["status"]] += 1
            if row["status"] != "succeeded":
                continue
            choices = (row.get("response") or {}).get("choices") or [{}]
            label = _sentiment((choices[0].get("message") or {}).get("content")) or "unparsed"
            sentiments[label] += 1
            by_product[product_of.get(row["custom_id"], "unknown")][label] += 1
        summary = {
            "vendor": VENDOR,
            "model": MODEL,
            "batch_id": manifest["batch_id"],
            "results": manifest["result_uri"],
            "rows": sum(statuses.values()),
            "statuses": dict(statuses),
            "sentiment": dict(sentiments),
            "by_product": {product: dict(counts) for product, counts in sorted(by_product.items())},
            "usage": manifest.get("usage", {}),
        }
        with ObjectStoragePath(files["summary"]).open("w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, ensure_ascii=False)
        return {**summary, "summary": files["summary"]}

    files = prepare_requests()
    create = CreateBatchOperator(
        task_id="create_batch",
        conn_id=CONN_ID,
        input_file=files["requests"],
        metadata={"pipeline": "review-sentiment"},
    )
    wait = BatchSensor(
        deferrable=True,  # wait in the triggerer: no worker slot held for hours
        task_id="wait_for_batch",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        poll_interval=POLL_INTERVAL,
        # A handful of refused reviews should not throw away the other answers.
        max_failed_fraction=0.05,
    )
    fetch = FetchBatchResultsOperator(
        task_id="fetch_results",
        conn_id=CONN_ID,
        batch_id=create.output["batch_id"],
        input_file=files["requests"],
        destination=files["results"],
    )
    wait >> fetch
    summarize(fetch.output, files)
