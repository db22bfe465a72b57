"""
The fetch's traffic in files with the vendor: download a batch's request, output and error files, delete them.

Kept apart from :mod:`airflow_provider_llmbatch.operators.results`, which says what a fetch does; this
module says how each file is moved, and what is worth failing the task for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from airflow_provider_llmbatch.exceptions import InvalidInputError, NotFoundError, VendorAPIError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators.reattach import recorded_requests


def download_input(hook: BatchHook, batch: Batch, folder: Path, name: str = "input.jsonl") -> str:
    """
    Download the request file a batch ran into ``folder``; return its path.

    :raises InvalidInputError: when the batch names none, the vendor does not serve request files, or
        the file is gone: each says to pass ``input_file=``.
    """
    spec = hook.vendor
    if not batch.input_file_id:
        raise InvalidInputError(f"Batch {batch.id} names no input file; pass input_file=")
    if not spec.input_content_downloadable:
        raise InvalidInputError(
            f"{spec.display_name} does not serve the content of request files, so the results of "
            f"batch {batch.id} cannot be joined without them; pass input_file= (for example "
            "\"{{ ti.xcom_pull(task_ids='<create task>')['input_uri'] }}\")"
        )
    path = folder / name
    try:
        hook.download_file(batch.input_file_id, path)
    except NotFoundError as exc:
        raise InvalidInputError(
            f"The request file {batch.input_file_id} of batch {batch.id} is gone at the vendor "
            f"(some vendors delete it after the batch); pass input_file=. ({exc})"
        ) from exc
    return str(path)


def download_inputs(hook: BatchHook, parts: Sequence[Batch], folder: Path) -> tuple[str, list[int | None]]:
    """
    Download the request files of a job's parts as one request file, in order; return its path and the
    requests of each part (exact, counted as they are copied; None for a one-part job, which needs none).
    """
    if len(parts) == 1:
        return download_input(hook, parts[0], folder), [None]
    path = folder / "input.jsonl"
    counts: list[int | None] = []
    with path.open("wb") as joined:
        for batch in parts:
            counts.append(_copied_requests(Path(download_input(hook, batch, folder, "part.jsonl")), joined))
    return str(path), counts


def part_requests(hook: BatchHook, parts: Sequence[Batch], folder: Path) -> list[int | None]:
    """
    Return the requests of each part of a job, where each part ends in the input: as the create recorded
    it in the batch's metadata, or as the vendor counts it, or else counted in the part's request file
    downloaded from the vendor (None for a one-part job, and for the last part, which need none).

    :raises InvalidInputError: a part's end is not known and its request file cannot be downloaded.
    """
    counts: list[int | None] = [None] * len(parts)
    for number, batch in enumerate(parts[:-1]):
        counts[number] = recorded_requests(batch)
        if counts[number] is None:
            try:
                part = Path(download_input(hook, batch, folder, "part.jsonl"))
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"part {number + 1} of {len(parts)}: batch {batch.id} records no request count, so "
                    f"where its requests end in input_file is unknown, and its request file cannot be "
                    f"counted: {exc}"
                ) from exc
            counts[number] = _copied_requests(part, None)
    return counts


def _copied_requests(part: Path, joined: IO[bytes] | None) -> int:
    """Count a downloaded request file's requests, copying it to ``joined`` (whole lines); remove it."""
    count, last = 0, b"\n"
    with part.open("rb") as lines:
        for line in lines:
            count += not line.isspace()
            if joined is not None:
                joined.write(line)
            last = line
    if joined is not None and not last.endswith(b"\n"):
        joined.write(b"\n")  # the next part's first line starts a line of its own
    part.unlink()
    return count


def download(hook: BatchHook, file_id: str | None, path: Path, log: logging.Logger | Any) -> Path | None:
    """Download an output or error file to ``path``, checked against its listed size; None without one."""
    if not file_id:
        return None
    expected: int | None = None
    try:
        # The listed size lets the download refuse a garbled body that would land as the file.
        expected = hook.get_file(file_id).bytes
    except VendorAPIError as exc:
        log.warning("Could not read the size of %s (%s); downloading unchecked", file_id, exc)
    size = hook.download_file(file_id, path, expected_bytes=expected)
    log.info("Downloaded %s (%d bytes)", file_id, size)
    return path


def delete_files(hook: BatchHook, file_ids: Sequence[str | None], log: logging.Logger | Any) -> None:
    """Delete files at the vendor; one already gone, or one that will not go, does not fail the task."""
    for file_id in file_ids:
        if not file_id:
            continue
        try:
            hook.delete_file(file_id)
            log.info("Deleted remote file %s", file_id)
        except NotFoundError:
            log.info("Remote file %s was already gone", file_id)
        except VendorAPIError as exc:
            # The results are landed; a leftover remote file is not worth failing (and re-running) for.
            log.warning("Could not delete remote file %s: %s", file_id, exc)
