"""
The manifest of a landed job: the small summary a fetch returns to XCom and announces.

It names the batches (parts and resubmission rounds), the results file, the row counts, token usage
(per batch and in total), the cost at the user's prices (or why there is none; see
:mod:`~airflow_provider_llmbatch.usage`) and anomalies; never a row, a request body or a secret.
The asset event's extra (:func:`~airflow_provider_llmbatch.assets.event_extra`) and the OpenLineage
facets (:mod:`~airflow_provider_llmbatch.lineage`) are read from it.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.pricing import PriceTable
from airflow_provider_llmbatch.results import JoinReport
from airflow_provider_llmbatch.usage import job_cost


def build_manifest(
    batches: list[list[Batch]],
    report: JoinReport,
    input_file: str,
    *,
    prices: PriceTable | None = None,
    model: str | None = None,
    result_format: str = "jsonl",
) -> dict[str, Any]:
    """
    Return the manifest of a job whose results are landed.

    :param batches: the batches of each round: the job's parts first, then each resubmission round's.
    :param report: what the join wrote (its ``batch_usage`` in the order of ``batches``, flattened).
    :param input_file: the request file the rows were joined to.
    :param prices: the user's price table, if any.
    :param model: the job's model, for its price.
    :param result_format: the results file's format.
    """
    parts = batches[0]
    usage = iter(report.batch_usage)
    per_round = [[(b, next(usage, {})) for b in r] for r in batches]
    cost = job_cost(
        prices, model, report.usage, [u for _, u in per_round[0]], [[u for _, u in r] for r in per_round[1:]]
    )
    return {
        "batch_id": parts[0].id,
        "batch_ids": [b.id for b in parts],
        "status": parts[0].status,
        "result_uri": report.result_uri,
        "format": result_format,
        "counts": report.counts,
        "usage": report.usage,
        "cost": cost,
        "anomalies": report.anomalies,
        "input_uri": input_file,
        "output_file_id": parts[0].output_file_id,
        "error_file_id": parts[0].error_file_id,
        "parts": [{**described(b), "usage": u} for b, u in per_round[0]],
        "rounds": [
            {"round": n, "batches": [{**described(b), "usage": u} for b, u in r]}
            for n, r in enumerate(per_round[1:], 1)
        ],
    }


def described(batch: Batch) -> dict[str, Any]:
    """Return a batch as the manifest lists it: id, status and request counts."""
    counts = batch.request_counts
    return {
        "batch_id": batch.id,
        "status": batch.status,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
    }
