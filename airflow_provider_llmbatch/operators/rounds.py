"""
A resubmission round's batches: the rows worth sending again, their request file and its parts.

A round's request file is kept beside the results file and split within the vendor's per-file limits on
the endpoint the job ran, as a job's input is (:func:`~airflow_provider_llmbatch.parts.split_checked`).
Each part's batch is named by the task instance, the round's requests, the round's number and the part's
index, so a retried task re-attaches to it whatever it became: a round is created once, and one the
vendor expired or cancelled stays that round's outcome (the next round, if any, sends its rows again).
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from airflow_provider_llmbatch.operators import reattach
from airflow_provider_llmbatch.parquet_out import ResultFormat
from airflow_provider_llmbatch.parts import split_checked
from airflow_provider_llmbatch.resubmit import retryable_ids, write_round

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_llmbatch.hooks.batch import BatchHook


def round_file(destination: str, number: int) -> str:
    """Return where round ``number``'s request file is kept: beside the results file."""
    stem = destination.removesuffix(".jsonl").removesuffix(".parquet")
    return f"{stem}.round-{number}.requests.jsonl"


def create_round(
    context: Context,
    hook: BatchHook,
    log: Any,
    *,
    input_file: str,
    destination: str,
    number: int,
    endpoint: str | None,
    format: ResultFormat,
) -> list[str]:
    """
    Create round ``number``'s batches of the landed rows worth resubmitting, or re-attach to them.

    :param input_file: the job's request file (the rows' requests are read from it).
    :param destination: the landed results file, whose rows are judged.
    :param number: the round's number, from 1.
    :param endpoint: the endpoint the job ran; the round runs on it, within its limits.
    :param format: the results file's format.
    :return: the round's batch ids, in order; empty when no row is worth sending again.
    """
    ids = set(retryable_ids(destination, hook.vendor, format))
    if not ids:
        return []
    path = round_file(destination, number)
    count, sha256 = write_round(input_file, ids, path)
    tracker = reattach.Tracker(context, hook, log, enabled=True, reattach_ended=True)
    made: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmbatch-round-") as folder:
        split = split_checked(path, hook.vendor, endpoint, folder=folder)
        for part in split.parts:
            name = f"round-{number}" if len(split.parts) == 1 else f"round-{number}-part-{part.index}"
            _, batch = tracker.submit(
                split,
                part,
                reattach.batch_key(context, sha256, name),
                lambda found: hook.create_batch(
                    input_file_id=found.file_id,
                    endpoint=found.report.endpoint,
                    metadata=reattach.batch_metadata(found),
                ),
            )
            made.append(batch.id)
    log.info(
        "Round %d: %d request(s) worth sending again, in %s %s",
        number,
        count,
        "batch" if len(made) == 1 else f"{len(made)} batches",
        ", ".join(made),
    )
    return made
