"""
OpenLineage reporting: the files a task read and wrote as datasets, the batches it ran as a run facet.

OpenLineage is optional (the ``openlineage`` extra): nothing here imports it until a lineage is built,
and :func:`operator_lineage` returns None when it is not installed. What is reported comes from what
the task returned (the create result, the fetch manifest), gathered in a :class:`BatchLineage`; it
carries ids, counts and locations, never a key, a request body or a result row.

Dataset names follow OpenLineage's naming conventions: a local file is namespace ``file`` and its
absolute path; an object is ``<scheme>://<bucket>`` and its key (``s3://bucket`` + ``requests/a.jsonl``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_llmbatch.vendors import vendor_for_conn_type

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

RUN_FACET = "llmbatch"
"""The key of :class:`~airflow_provider_llmbatch.lineage_facet.LLMBatchRunFacet` in a run's facets."""

_SCHEMES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}
"""Object storage schemes OpenLineage names otherwise (its S3 and GCS conventions)."""

_CONTAINER_SCHEMES = frozenset({"abfs", "abfss", "wasb", "wasbs"})
"""Azure schemes whose ``container@account`` names the container: part of the namespace, not a login."""


def dataset_name(location: str | os.PathLike[str]) -> tuple[str, str]:
    """
    Return the OpenLineage ``(namespace, name)`` of a file: a local path or a URI.

    User info in a URI (``s3://key:secret@bucket``) is dropped: a name is never a secret. An Azure
    container (``abfss://container@account.dfs.core.windows.net``) is kept, as OpenLineage names it.
    """
    text = os.fspath(location)
    if "://" not in text:
        return "file", os.path.abspath(text)
    parts = urlsplit(text)
    scheme = _SCHEMES.get(parts.scheme.lower(), parts.scheme.lower())
    login, at, host = parts.netloc.rpartition("@")
    if at and scheme in _CONTAINER_SCHEMES and login and ":" not in login:
        host = f"{login}@{host}"
    if scheme == "file":
        return ("file" if host in ("", "localhost") else f"file://{host}"), parts.path or "/"
    return (f"{scheme}://{host}" if host else scheme), parts.path.lstrip("/") or "/"


@dataclass(frozen=True)
class BatchLineage:
    """
    What a task reports: the files it read and wrote, and the vendor batches it ran.

    :param conn_type: the connection type, which names the vendor.
    :param batch_ids: every batch of the job (its parts, then any resubmission rounds).
    :param inputs: the request files read (paths or URIs).
    :param outputs: the files written (paths or URIs).
    :param endpoint: the batch endpoint.
    :param model: the one model of the requests, when known.
    :param status: the (first) batch's status when the task ended.
    :param request_count: the number of requests.
    :param request_counts: counts by outcome (the batch's, or the landed rows').
    :param rows: the number of rows written to the output.
    """

    conn_type: str
    batch_ids: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    endpoint: str | None = None
    model: str | None = None
    status: str | None = None
    request_count: int | None = None
    request_counts: dict[str, int] | None = None
    rows: int | None = None

    @classmethod
    def of_create(cls, result: Mapping[str, Any]) -> BatchLineage:
        """Return the lineage of a create: its result (or, after a wait, the judged summary over it)."""
        counts = result.get("request_counts")
        return cls(
            conn_type=str(result["conn_type"]),
            batch_ids=[str(b) for b in result.get("batch_ids") or [result["batch_id"]]],
            inputs=[str(result["input_uri"])] if result.get("input_uri") else [],
            endpoint=result.get("endpoint"),
            model=result.get("model"),
            status=result.get("status"),
            request_count=result.get("request_count"),
            # Before a wait this is the per-part list of request counts, not counts by outcome.
            request_counts=_int_map(counts) if isinstance(counts, Mapping) else None,
        )

    @classmethod
    def of_fetch(
        cls, manifest: Mapping[str, Any], *, conn_type: str, endpoint: str | None, input_file: str | None
    ) -> BatchLineage:
        """
        Return the lineage of a fetch from its manifest.

        :param input_file: the request file the user named; None when it was downloaded from the vendor
            into a temporary file, which is no dataset anyone can find again.
        """
        counts = _int_map(manifest.get("counts") or {})
        rounds = [b["batch_id"] for r in manifest.get("rounds") or [] for b in r.get("batches") or []]
        return cls(
            conn_type=conn_type,
            batch_ids=[*manifest["batch_ids"], *rounds],
            inputs=[input_file] if input_file else [],
            outputs=[str(manifest["result_uri"])],
            endpoint=endpoint,
            status=manifest.get("status"),
            request_count=counts.get("total"),
            request_counts={k: v for k, v in counts.items() if k != "total"},
            rows=counts.get("total"),
        )


def operator_lineage(facts: BatchLineage) -> OperatorLineage[Any, Any] | None:
    """Return the lineage as OpenLineage's ``OperatorLineage``; None when OpenLineage is not installed."""
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import InputDataset, OutputDataset
        from openlineage.client.facet_v2 import external_query_run, output_statistics_output_dataset

        from airflow_provider_llmbatch.lineage_facet import LLMBatchRunFacet
    except ImportError:
        return None
    spec = vendor_for_conn_type(facts.conn_type)
    output_facets: dict[str, Any] = {}
    if facts.rows is not None:
        statistics = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=facts.rows)
        output_facets["outputStatistics"] = statistics
    run_facets: dict[str, Any] = {
        RUN_FACET: LLMBatchRunFacet(
            vendor=spec.name,
            connType=facts.conn_type,
            batchIds=list(facts.batch_ids),
            endpoint=facts.endpoint,
            model=facts.model,
            status=facts.status,
            requestCount=facts.request_count,
            requestCounts=facts.request_counts,
        )
    }
    if facts.batch_ids:
        run_facets["externalQuery"] = external_query_run.ExternalQueryRunFacet(
            externalQueryId=facts.batch_ids[0], source=facts.conn_type
        )
    return OperatorLineage(
        inputs=[InputDataset(*dataset_name(uri)) for uri in facts.inputs],
        outputs=[OutputDataset(*dataset_name(uri), outputFacets=output_facets) for uri in facts.outputs],
        run_facets=run_facets,
    )


def _int_map(values: Mapping[str, Any]) -> dict[str, int]:
    return {str(k): v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}
