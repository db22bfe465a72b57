"""
The Airflow asset a results-landing task announces: one per logical result set, not one per run.

Each ``FetchBatchResultsOperator`` declares one asset in its outlets, named after its DAG and task
(:func:`results_asset`), so the DAG processor registers it when it parses the DAG and every run's event
has a model to land on. The concrete file of a run is not an asset of its own: it travels in the event's
``extra`` (``result_uri``, beside a summary of the manifest), where a downstream DAG scheduled on the
asset reads it from ``triggering_asset_events``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import Asset

RESULTS_ASSET_GROUP = "llmbatch-results"
"""The group of every results asset, and the first part of its name."""

RESULTS_ASSET_SCHEME = "llmbatch"
"""The URI scheme of the results assets the operators name themselves."""

EVENT_EXTRA_KEYS = ("batch_id", "batch_ids", "status", "result_uri", "counts", "usage", "anomalies")
"""The manifest fields an asset event carries: small, and never a secret (no key, no row)."""


def results_asset(dag_id: str, task_id: str) -> Asset:
    """
    Return the asset of the results a task lands, run after run.

    Schedule on it with ``schedule=results_asset("<dag id>", "<task id>")``, or by name with
    ``Asset.ref(name="llmbatch-results/<dag id>/<task id>")``.

    :param dag_id: the DAG of the landing task.
    :param task_id: the landing task (with its task group prefix, if any).
    """
    return Asset(
        name=f"{RESULTS_ASSET_GROUP}/{dag_id}/{task_id}",
        uri=f"{RESULTS_ASSET_SCHEME}://results/{dag_id}/{task_id}",
        group=RESULTS_ASSET_GROUP,
    )


def event_extra(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Return the extra of a results asset event: the manifest's summary fields."""
    return {key: manifest[key] for key in EVENT_EXTRA_KEYS if key in manifest}
