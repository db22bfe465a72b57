"""
The OpenLineage run facet of an LLM batch job. Imports OpenLineage: load it only where that is installed.

Reported under the ``llmbatch`` key of a task's run facets, next to the standard ``externalQuery`` facet
(the first batch id). Its fields are ids, names and counts; never a key or a request.
"""

from __future__ import annotations

from attrs import define, field
from openlineage.client.facet_v2 import RunFacet


@define
class LLMBatchRunFacet(RunFacet):
    """
    The vendor batches a task ran.

    :param vendor: the vendor's registry name, e.g. ``zhipu``.
    :param connType: the Airflow connection type, e.g. ``llmbatch_zhipu``.
    :param batchIds: every batch of the job: its parts, then any resubmission rounds.
    :param endpoint: the batch endpoint, e.g. ``/v4/chat/completions``.
    :param model: the one model of the requests, when known.
    :param status: the (first) batch's status when the task ended.
    :param requestCount: the number of requests.
    :param requestCounts: counts by outcome: the batch's (``completed``, ``failed``) or the landed rows'
        (``succeeded``, ``failed``, ``expired``, ``cancelled``, ``missing``).
    """

    vendor: str
    connType: str
    batchIds: list[str] = field(factory=list)
    endpoint: str | None = None
    model: str | None = None
    status: str | None = None
    requestCount: int | None = None
    requestCounts: dict[str, int] | None = None
