"""The operator that cancels an LLM batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.links.batch import XCOM_BATCH_ID, XCOM_CONN_TYPE, BatchConsoleLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class CancelBatchOperator(BaseOperator):
    """
    Cancel an LLM batch; a batch that has already ended is left as it is.

    Returns the batch summary after the cancel request (often ``cancelling``; the vendor finishes it).

    :param batch_id: the vendor's batch id. (templated)
    :param conn_id: the LLM batch connection. (templated) (default: ``llmbatch_default``)
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id")
    operator_extra_links = (BatchConsoleLink(),)

    def __init__(self, *, batch_id: str, conn_id: str = BatchHook.default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_id = batch_id
        self.conn_id = conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        """Cancel the batch unless it has already ended; return its summary."""
        if not isinstance(self.batch_id, str) or not self.batch_id.strip():
            raise InvalidInputError(f"batch_id must be a non-empty string, got {self.batch_id!r}")
        hook = BatchHook(self.conn_id)
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key=XCOM_BATCH_ID, value=self.batch_id.strip())
            ti.xcom_push(key=XCOM_CONN_TYPE, value=hook.vendor.conn_type)
        return waiting.cancel_if_running(hook, self.batch_id.strip(), self.log).summary()
