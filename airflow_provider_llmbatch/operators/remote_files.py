"""
The fetch's traffic in files with the vendor: download a batch's request, output and error files, delete them.

Kept apart from :mod:`airflow_provider_llmbatch.operators.results`, which says what a fetch does; this
module says how each file is moved, and what is worth failing the task for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError, NotFoundError, VendorAPIError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.models import Batch


def download_input(hook: BatchHook, batch: Batch, folder: Path) -> str:
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
    path = folder / "input.jsonl"
    try:
        hook.download_file(batch.input_file_id, path)
    except NotFoundError as exc:
        raise InvalidInputError(
            f"The request file {batch.input_file_id} of batch {batch.id} is gone at the vendor "
            f"(some vendors delete it after the batch); pass input_file=. ({exc})"
        ) from exc
    return str(path)


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
