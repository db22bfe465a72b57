"""A link from a task to the vendor's console page of its batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from airflow_provider_llmbatch.vendors import vendor_for_conn_type

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

XCOM_BATCH_ID = "batch_id"
"""The XCom key a task pushes its batch id under, before it waits."""

XCOM_CONN_TYPE = "conn_type"
"""The XCom key a task pushes its connection type under; it decides the vendor."""


def console_url(conn_type: Any, batch_id: Any) -> str:
    """Return the vendor's console URL of a batch, or ``""`` when the vendor or the batch is unknown."""
    if not conn_type or not batch_id:
        return ""
    try:
        spec = vendor_for_conn_type(str(conn_type))
    except KeyError:
        return ""
    if not spec.console_url:
        return ""
    return spec.console_url.format(batch_id=quote(str(batch_id), safe=""))


class BatchConsoleLink(BaseOperatorLink):
    """Link to the vendor's console page of the batch, from the ``batch_id`` and ``conn_type`` XComs."""

    name = "Batch console"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """Return the console URL of the task's batch, or ``""`` before the batch is known."""
        batch_id = XCom.get_value(ti_key=ti_key, key=XCOM_BATCH_ID)
        if not batch_id:
            return ""
        return console_url(XCom.get_value(ti_key=ti_key, key=XCOM_CONN_TYPE), batch_id)
