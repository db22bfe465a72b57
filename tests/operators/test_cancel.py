"""CancelBatchOperator: cancel a batch that still runs; leave one that has ended as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch import waiting
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators.cancel import CancelBatchOperator
from tests.operators.conftest import CONN_ID, FakeTI, make_context, request_file
from tests.operators.conftest import create_op as _op
from tests.pollkit import RecordingLog


def test_cancel_operator(connect: Any, tmp_path: Path) -> None:
    emu = connect("dashscope")
    created = _op(input_file=str(request_file(tmp_path, "dashscope"))).execute(make_context(FakeTI()))
    ti = FakeTI(task_id="cancel")

    summary = CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=created["batch_id"]).execute(
        make_context(ti)
    )

    assert summary["status"] in ("cancelling", "cancelled")
    assert ti.xcom("batch_id") == created["batch_id"]
    emu.force_status("dashscope", created["batch_id"], "cancelled")
    again = CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=created["batch_id"]).execute(
        make_context(FakeTI())
    )
    assert again["status"] == "cancelled"
    assert emu.stats("dashscope")["cancels"] == 1

    with pytest.raises(InvalidInputError):
        CancelBatchOperator(task_id="cancel", conn_id=CONN_ID, batch_id=" ").execute(make_context(FakeTI()))


class StatusHook:
    """A batch in a given status; records the cancel requests it gets."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.cancels = 0

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.model_validate({"id": batch_id, "status": self.status})

    def cancel_batch(self, batch_id: str) -> Batch:
        self.cancels += 1
        return Batch.model_validate({"id": batch_id, "status": "cancelling"})


@pytest.mark.parametrize(
    ("status", "cancelled"),
    [
        ("validating", True),
        ("in_progress", True),
        ("finalizing", True),
        ("paused_by_vendor", True),  # a status no vendor documents is not an end
        ("cancelling", False),
        ("completed", False),
        ("failed", False),
        ("expired", False),
        ("cancelled", False),
    ],
)
def test_which_batches_get_a_cancel_request(status: str, cancelled: bool) -> None:
    hook = StatusHook(status)
    batch = waiting.cancel_if_running(hook, "b1", RecordingLog())  # type: ignore[arg-type]
    assert hook.cancels == int(cancelled)
    assert batch.status == ("cancelling" if cancelled else status)
