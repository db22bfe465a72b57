"""
Which failed requests are worth sending again, and the request file of a resubmission round.

A request is resubmitted when it failed for a reason that may not last: the vendor rate limited it,
was overloaded or failed on its side (the vendor's ``retryable_codes`` in the registry), or it never
ran because its batch expired or was cancelled. A request refused for what it is (invalid, filtered,
too long) is never sent again: it would fail the same way. Nor is an ``invalid_output`` row (an answer
that did not match the output schema): the vendor ran it and bills it, and asking again is the user's
call (a better prompt, a stricter schema), not a transient failure's remedy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.locations import Location, atomic_writer, open_read
from airflow_provider_llmbatch.parquet_out import ResultFormat, iter_rows
from airflow_provider_llmbatch.vendors import VendorSpec

UNRUN_CODES = frozenset({"batch_expired", "batch_cancelled"})
"""Error codes of requests that never ran because their batch ended (every vendor's convention)."""


def worth_resubmitting(row: dict[str, Any], vendor: VendorSpec) -> bool:
    """Return whether a result row failed for a reason that may not last (see the module)."""
    status = row.get("status")
    if status in ("expired", "cancelled"):
        return True
    error = row.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return (
        status == "failed"
        and isinstance(code, str)
        and (vendor.errors.is_retryable(code) or code in UNRUN_CODES)
    )


def retryable_ids(results: Location, vendor: VendorSpec, format: ResultFormat = "jsonl") -> Iterator[str]:
    """Yield the custom ids of the rows of a results file (JSONL or Parquet) worth sending again, in order."""
    if format == "parquet":
        for row in iter_rows(results, ("custom_id", "status", "error")):
            if worth_resubmitting(row, vendor):
                yield str(row["custom_id"])
        return
    with open_read(results) as handle:
        for raw in handle:
            if raw.isspace():
                continue
            row = codec.parse_vendor_line(raw)
            if isinstance(row, dict) and worth_resubmitting(row, vendor):
                yield str(row["custom_id"])


def write_round(requests: Location, ids: set[str], destination: Location) -> tuple[int, str]:
    """
    Write the request lines of ``ids`` (in the request file's order) as a round's request file.

    :param ids: the ids to send again; each is taken out of the set as its first line is written, so an
        id the request file repeats is sent once (the rows of its lines share the answer).
    :return: how many lines it holds, and the SHA-256 of its bytes (the round's identity).
    """
    sha = hashlib.sha256()
    count = 0
    with open_read(requests) as handle, atomic_writer(destination) as out:
        for raw in handle:
            request = codec.read_request(raw, False) if not raw.isspace() else None
            if request is None or request[0] not in ids:
                continue
            ids.discard(request[0])
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            out.write(line)
            sha.update(line)
            count += 1
    return count, sha.hexdigest()
