"""The operator that deletes the provider's old uploads, so leftovers never fill a vendor's file quota."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_llmbatch.exceptions import LLMBatchError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import check_age_days

if TYPE_CHECKING:
    from airflow.sdk import Context

SHOWN_FAILURES = 5
"""Failed deletions named in the task's error; the rest are counted."""


class CleanupRemoteFilesOperator(BaseOperator):
    """
    Delete the request files this provider uploaded more than ``older_than_days`` days ago.

    Moonshot keeps at most 1,000 batch files per organization and DashScope 10,000; files left behind by
    jobs that never deleted their input (see ``delete_input_file``) count against that. Only the
    provider's own uploads are touched (recognised by name, see
    :mod:`~airflow_provider_llmbatch.hooks.uploads`), never a file a batch that has not ended still reads.
    Returns a small summary (counts, bytes, up to 100 file ids). The task fails, after deleting all it
    could, if any file could not be deleted.

    :param conn_id: the LLM batch connection. (templated) (default: ``llmbatch_default``)
    :param older_than_days: only files created more than this many days ago. (templated) (default: 7)
    :param dry_run: log and return what would be deleted; delete nothing. (default: False)
    """

    template_fields: Sequence[str] = ("conn_id", "older_than_days")

    def __init__(
        self,
        *,
        conn_id: str = BatchHook.default_conn_name,
        older_than_days: float | str = 7,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.older_than_days = older_than_days
        # Not ``self.dry_run``: that name is BaseOperator's method, which a bool would shadow.
        self.list_only = bool(dry_run)

    def execute(self, context: Context) -> dict[str, Any]:
        """Delete (or list) the old uploads; return the summary."""
        days = check_age_days(self.older_than_days)
        cleanup = BatchHook(self.conn_id).delete_uploaded_files(days, dry_run=self.list_only)
        verb = "Would delete" if self.list_only else "Deleted"
        self.log.info(
            "%s %d uploaded request files (%d bytes) created before %s",
            verb,
            len(cleanup.files),
            cleanup.bytes,
            cleanup.cutoff.isoformat(),
        )
        for file in cleanup.files:
            self.log.info("%s %s (%s, created %s)", verb, file.id, file.filename, file.created_at)
        if cleanup.in_use:
            self.log.info("Kept %d files a batch that has not ended reads", len(cleanup.in_use))
        if cleanup.undated:
            self.log.warning("Kept %d files the vendor gives no creation time for", len(cleanup.undated))
        if cleanup.failed:
            shown = "; ".join(f"{fid}: {err}" for fid, err in list(cleanup.failed.items())[:SHOWN_FAILURES])
            more = len(cleanup.failed) - SHOWN_FAILURES
            raise LLMBatchError(
                f"could not delete {len(cleanup.failed)} files ({shown}"
                + (f"; and {more} more)" if more > 0 else ")")
            )
        return cleanup.summary()
