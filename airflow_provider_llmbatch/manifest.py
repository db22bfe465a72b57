"""
The manifest of a landed job: the small summary a fetch returns to XCom and announces.

It names the batches (parts and resubmission rounds), the results file, the row counts, token usage and
anomalies; never a row, a request body or a secret. The asset event's extra
(:func:`~airflow_provider_llmbatch.assets.event_extra`) and the OpenLineage facets
(:mod:`~airflow_provider_llmbatch.lineage`) are read from it.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.results import JoinReport


def build_manifest(batches: list[list[Batch]], report: JoinReport, input_file: str) -> dict[str, Any]:
    """
    Return the manifest of a job whose results are landed.

    :param batches: the batches of each round: the job's parts first, then each resubmission round's.
    :param report: what the join wrote.
    :param input_file: the request file the rows were joined to.
    """
    parts = batches[0]
    return {
        "batch_id": parts[0].id,
        "batch_ids": [b.id for b in parts],
        "status": parts[0].status,
        "result_uri": report.result_uri,
        "counts": report.counts,
        "usage": report.usage,
        "anomalies": report.anomalies,
        "input_uri": input_file,
        "output_file_id": parts[0].output_file_id,
        "error_file_id": parts[0].error_file_id,
        "parts": [described(b) for b in parts],
        "rounds": [{"round": n, "batches": [described(b) for b in r]} for n, r in enumerate(batches[1:], 1)],
    }


def described(batch: Batch) -> dict[str, Any]:
    """Return a batch as the manifest lists it: id, status and request counts."""
    counts = batch.request_counts
    return {
        "batch_id": batch.id,
        "status": batch.status,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
    }
