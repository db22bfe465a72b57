"""A link from a task to the vendor's console page of its batch, in the console of the connection's region."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseHook, BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

from airflow_provider_llmbatch.hooks.settings import connection_region
from airflow_provider_llmbatch.vendors import vendor_for_conn_type

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

XCOM_BATCH_ID = "batch_id"
"""The XCom key a task pushes its batch id under, before it waits."""

XCOM_CONN_TYPE = "conn_type"
"""The XCom key a task pushes its connection type under; it decides the vendor."""


def console_url(conn_type: Any, batch_id: Any, region: str | None = None) -> str:
    """
    Return the console URL of a batch, or ``""`` when the vendor, the batch or the console is unknown.

    :param conn_type: the connection type; decides the vendor.
    :param batch_id: the batch.
    :param region: the connection's region (None, or one the vendor does not have: its default region).
        A region without a known console gets no link: another region's console is another account.
    """
    if not conn_type or not batch_id:
        return ""
    try:
        spec = vendor_for_conn_type(str(conn_type))
    except KeyError:
        return ""
    template = spec.console_url_for(region if region in spec.base_urls else None)
    return template.format(batch_id=quote(str(batch_id), safe="")) if template else ""


def task_region(operator: Any, conn_type: Any) -> str | None:
    """
    Return the region of the task's connection (``operator.conn_id``), or None when it cannot be read.

    Links are made on the worker when the task ends, where the connection can be read; only its host and
    extras are looked at, never its key.
    """
    conn_id = getattr(operator, "conn_id", None)
    if not isinstance(conn_id, str) or not conn_id:
        return None
    try:
        spec = vendor_for_conn_type(str(conn_type))
        conn = BaseHook.get_connection(conn_id)
        if conn.conn_type != spec.conn_type:
            return None
        return connection_region(spec, conn.host, conn.extra_dejson)
    except Exception:
        # A link is never worth failing a task over: without the region, the default console is shown.
        return None


class BatchConsoleLink(BaseOperatorLink):
    """
    Link to the vendor's console page of the batch, from the ``batch_id`` and ``conn_type`` XComs.

    The console is the one of the connection's region (e.g. DashScope Beijing or Singapore, Moonshot
    ``.cn`` or ``.ai``), read from the task's connection.
    """

    name = "Batch console"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """Return the console URL of the task's batch, or ``""`` before the batch is known."""
        batch_id = XCom.get_value(ti_key=ti_key, key=XCOM_BATCH_ID)
        if not batch_id:
            return ""
        conn_type = XCom.get_value(ti_key=ti_key, key=XCOM_CONN_TYPE)
        return console_url(conn_type, batch_id, task_region(operator, conn_type))
