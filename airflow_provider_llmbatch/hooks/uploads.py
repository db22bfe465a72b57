"""
The request files this provider uploads: how they are named, and which of them a cleanup may delete.

Every upload the operators make is named ``llmbatch-<32 hex>.jsonl`` (:func:`upload_name`, the key being
the part's or round's retry-safe identity). A cleanup recognises the provider's files by that name alone
and never touches another file: not one uploaded by hand or by another tool, not a vendor's output or
error file, and not one a batch that has not ended still reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.models import Batch, FileObject

UPLOAD_PREFIX = "llmbatch-"
_UPLOAD_NAME = re.compile(r"llmbatch-[0-9a-f]{32}\.jsonl")

MAX_AGE_DAYS = 3650.0
"""The largest ``older_than_days`` accepted (ten years)."""


def upload_name(key: str) -> str:
    """Return the name a request file is uploaded under for a part's or round's key (32 hex characters)."""
    name = f"{UPLOAD_PREFIX}{key}.jsonl"
    if not _UPLOAD_NAME.fullmatch(name):
        raise ValueError(f"an upload key is 32 lowercase hex characters, got {key!r}")
    return name


def is_provider_upload(file: FileObject) -> bool:
    """Return whether a file was uploaded by this provider (by its name; any purpose but output/error)."""
    return file.filename is not None and _UPLOAD_NAME.fullmatch(file.filename) is not None


def check_age_days(value: object) -> float:
    """
    Return ``older_than_days`` as a float, or refuse it.

    :param value: a number, or its text (a rendered template).
    :raises InvalidInputError: for anything but a finite number of days from 0 to :data:`MAX_AGE_DAYS`.
    """
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InvalidInputError(f"older_than_days must be a number of days, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInputError(f"older_than_days must be a number of days, got {value!r}")
    try:
        days = float(value)
    except OverflowError:  # an int with more than about 308 digits
        days = math.inf
    if not math.isfinite(days) or not 0 <= days <= MAX_AGE_DAYS:
        raise InvalidInputError(f"older_than_days must be from 0 to {MAX_AGE_DAYS:g} days, got {value!r}")
    return days


@dataclass
class Cleanup:
    """What a cleanup deleted (or, on a dry run, would delete), what it kept and why."""

    dry_run: bool
    cutoff: datetime
    """Files created before this moment were old enough."""
    files: list[FileObject] = field(default_factory=list)
    """The provider's files old enough and not in use: deleted, or listed on a dry run."""
    in_use: list[str] = field(default_factory=list)
    """Ids of old enough files kept because a batch that has not ended reads them."""
    undated: list[str] = field(default_factory=list)
    """Ids of the provider's files kept because the vendor gave no creation time."""
    failed: dict[str, str] = field(default_factory=dict)
    """File id to the error that kept it from being deleted."""

    @property
    def bytes(self) -> int:
        """Bytes held by :attr:`files` (files of unknown size count as 0)."""
        return sum(file.bytes or 0 for file in self.files)

    def summary(self, max_ids: int = 100) -> dict[str, object]:
        """Return a small JSON-safe summary (for XCom): counts, bytes and at most ``max_ids`` ids."""
        ids = [file.id for file in self.files]
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat(),
            "count": len(ids),
            "bytes": self.bytes,
            "file_ids": ids[:max_ids],
            "more_file_ids": max(0, len(ids) - max_ids),
            "kept_in_use": len(self.in_use),
            "kept_undated": len(self.undated),
            "failed": len(self.failed),
        }


def select_stale(
    files: Iterable[FileObject], batches: Iterable[Batch], older_than_days: float, *, dry_run: bool
) -> Cleanup:
    """
    Return the provider's uploads created more than ``older_than_days`` ago that no running batch reads.

    :param files: every file of the account (any purpose; only the provider's uploads are considered).
    :param batches: every batch of the account, to keep the input of one that has not ended.
    """
    cutoff = datetime.now(UTC) - timedelta(days=older_than_days)
    result = Cleanup(dry_run=dry_run, cutoff=cutoff)
    old: list[FileObject] = []
    for file in files:
        if not is_provider_upload(file):
            continue
        if file.created_at is None:
            result.undated.append(file.id)
        elif file.created_at < cutoff:
            old.append(file)
    if not old:
        return result
    reading = {batch.input_file_id for batch in batches if not batch.is_terminal and batch.input_file_id}
    for file in old:
        if file.id in reading:
            result.in_use.append(file.id)
        else:
            result.files.append(file)
    return result
