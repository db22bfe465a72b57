"""CleanupRemoteFilesOperator and BatchHook.delete_uploaded_files: only the provider's old, idle uploads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.faults import FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError, LLMBatchError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.operators.cleanup import CleanupRemoteFilesOperator
from airflow_provider_llmbatch.retry import NO_RETRY
from tests.operators.conftest import CONN_ID, FakeTI, make_context, request_file
from tests.operators.conftest import create_op as _op

DAY = 86_400.0
VENDORS = ["zhipu", "moonshot", "dashscope", "openai"]


def _key(n: int) -> str:
    return f"{n:032x}"


class Account:
    """Files put straight into the emulator's store, as earlier jobs (and other people) left them."""

    def __init__(self, emu: Emulator, vendor: str) -> None:
        self.emu, self.vendor = emu, vendor
        self.store = emu.runtime.store
        self.content = self.store.new_path(vendor, ".jsonl")
        self.content.write_text('{"custom_id": "a"}\n')

    def add(self, filename: str, age_days: float, *, purpose: str = "batch", kind: str = "input") -> str:
        created = self.store.clock() - age_days * DAY
        record = self.store.add_file(
            self.vendor, self.content, filename=filename, purpose=purpose, kind=kind, created_at=created
        )
        return str(record.id)

    def ids(self) -> set[str]:
        return {f["id"] for f in self.emu.files(self.vendor)}


def _seed(account: Account) -> dict[str, Any]:
    """Old and new provider uploads beside files that are not the provider's."""
    ours_old = [account.add(upload_name(_key(n)), 10 + n) for n in range(3)]
    return {
        "ours_old": ours_old,
        "ours_new": account.add(upload_name(_key(99)), 2),
        "foreign": [
            account.add("old-input.jsonl", 30),
            account.add("llmbatch-notours.jsonl", 30),  # the prefix alone is not the provider's name
            account.add(upload_name(_key(7)).upper(), 30),
            account.add(upload_name(_key(8)) + ".bak", 30),
            account.add("output.jsonl", 30, purpose="batch_output", kind="output"),
        ],
    }


@pytest.mark.parametrize("vendor", VENDORS)
def test_dry_run_lists_the_old_uploads_and_the_run_deletes_exactly_them(connect: Any, vendor: str) -> None:
    emu = connect(vendor)
    account = Account(emu, vendor)
    seeded = _seed(account)
    everything = account.ids()

    listed = CleanupRemoteFilesOperator(
        task_id="cleanup", conn_id=CONN_ID, older_than_days=7, dry_run=True
    ).execute(make_context(FakeTI()))

    assert listed["dry_run"] is True
    assert sorted(listed["file_ids"]) == sorted(seeded["ours_old"])
    assert listed["count"] == 3
    assert listed["bytes"] == 3 * account.content.stat().st_size
    assert account.ids() == everything
    assert emu.stats(vendor)["operations"].get("delete_file", 0) == 0

    done = CleanupRemoteFilesOperator(task_id="cleanup", conn_id=CONN_ID, older_than_days=7).execute(
        make_context(FakeTI())
    )

    assert sorted(done["file_ids"]) == sorted(seeded["ours_old"])
    assert account.ids() == everything - set(seeded["ours_old"])
    # Run again: nothing left that is the provider's and old enough.
    again = CleanupRemoteFilesOperator(task_id="cleanup", conn_id=CONN_ID, older_than_days=7).execute(
        make_context(FakeTI())
    )
    assert again["count"] == 0
    # Zero days: the recent upload goes too; other people's files never do.
    CleanupRemoteFilesOperator(task_id="cleanup", conn_id=CONN_ID, older_than_days="0").execute(
        make_context(FakeTI())
    )
    assert account.ids() == set(seeded["foreign"])


def test_an_upload_a_running_batch_reads_is_kept_until_the_batch_ends(connect: Any, tmp_path: Path) -> None:
    emu = connect("moonshot")
    created = _op(input_file=str(request_file(tmp_path, "moonshot"))).execute(make_context(FakeTI()))
    (uploaded,) = [f for f in emu.files("moonshot") if f["id"] == created["input_file_id"]]
    assert uploaded["filename"].startswith("llmbatch-")  # named by the operator, recognised by the cleanup

    with BatchHook(CONN_ID) as hook:
        kept = hook.delete_uploaded_files(0)
        assert (kept.files, kept.in_use) == ([], [created["input_file_id"]])
        assert created["input_file_id"] in {f["id"] for f in emu.files("moonshot")}

        emu.force_status("moonshot", created["batch_id"], "completed")
        gone = hook.delete_uploaded_files(0)

    assert [f.id for f in gone.files] == [created["input_file_id"]]
    assert created["input_file_id"] not in {f["id"] for f in emu.files("moonshot")}


def test_files_the_vendor_gives_no_time_for_are_kept(connect: Any) -> None:
    emu = connect("zhipu")
    account = Account(emu, "zhipu")
    file_id = account.add(upload_name(_key(1)), 30)
    with BatchHook(CONN_ID) as hook:
        cleanup = select_with_undated(hook, file_id)
    assert cleanup.files == []
    assert cleanup.undated == [file_id]


def select_with_undated(hook: BatchHook, file_id: str) -> Any:
    """Run the selection over a listing whose one file carries no creation time."""
    from airflow_provider_llmbatch.hooks.uploads import select_stale

    (file,) = [f for f in hook.list_files() if f.id == file_id]
    undated = file.model_copy(update={"created_at": None})
    return select_stale([undated], hook.list_batches(), 0, dry_run=False)


def test_a_file_that_cannot_be_deleted_fails_the_task_after_the_others_are_gone(
    connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = connect("dashscope")
    # The operator's hook reads the connection: no retries there either, so each failure shows at once.
    name = f"AIRFLOW_CONN_{CONN_ID.upper()}"
    monkeypatch.setenv(name, json.dumps({**json.loads(os.environ[name]), "extra": {"max_retries": 0}}))
    account = Account(emu, "dashscope")
    ids = [account.add(upload_name(_key(n)), 20) for n in range(3)]
    # Every delete fails once the first has gone through.
    with BatchHook(CONN_ID, retry_policy=NO_RETRY) as hook:
        hook.delete_file(ids[0])
        emu.add_fault(FaultRule("500", vendor="dashscope", operation="delete_file", times=1))
        cleanup = hook.delete_uploaded_files(7)
    assert len(cleanup.failed) == 1
    assert len(cleanup.files) == 1
    assert set(cleanup.failed) | {f.id for f in cleanup.files} == set(ids[1:])
    assert account.ids() == set(cleanup.failed)

    emu.add_fault(FaultRule("500", vendor="dashscope", operation="delete_file", times=None))
    op = CleanupRemoteFilesOperator(task_id="cleanup", conn_id=CONN_ID, older_than_days=7)
    with pytest.raises(LLMBatchError, match=r"could not delete 1 files \(" + next(iter(cleanup.failed))):
        op.execute(make_context(FakeTI()))
    emu.clear_faults()


@pytest.mark.parametrize("days", [-1, float("nan"), float("inf"), "soon", True, None, 10**400, 3651, [7]])
def test_a_bad_age_is_refused_before_any_call(connect: Any, days: Any) -> None:
    emu = connect("moonshot")
    before = dict(emu.stats("moonshot")["operations"])
    with pytest.raises(InvalidInputError, match="older_than_days"):
        CleanupRemoteFilesOperator(task_id="cleanup", conn_id=CONN_ID, older_than_days=days).execute(
            make_context(FakeTI())
        )
    with BatchHook(CONN_ID) as hook, pytest.raises(InvalidInputError, match="older_than_days"):
        hook.delete_uploaded_files(days)
    assert emu.stats("moonshot")["operations"] == before


def test_the_cutoff_is_now_minus_the_age(connect: Any) -> None:
    emu = connect("openai")
    account = Account(emu, "openai")
    just_over = account.add(upload_name(_key(1)), 1 + 60 / DAY)
    just_under = account.add(upload_name(_key(2)), 1 - 60 / DAY)
    with BatchHook(CONN_ID) as hook:
        cleanup = hook.delete_uploaded_files(1, dry_run=True)
    assert [f.id for f in cleanup.files] == [just_over]
    assert just_under in account.ids()
    assert abs(cleanup.cutoff.timestamp() - (time.time() - DAY)) < 60
