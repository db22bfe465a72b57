"""
The vendor's batch-file quota is checked before the first upload of every try, not only the first try.

A retry finds what an earlier try made (with a task state store, or without one as before Airflow 3.3)
and reuses its uploads: those need no new file, so a retry of a job that fitted is not refused, and a
retry that would not fit is refused before it uploads anything (never half a job left running). DashScope
keeps 10,000 batch files per account; its test endpoint makes 250 requests three parts.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    STORES,
    FakeTI,
    hold_files,
    make_context,
    parts_op,
    state_store,
)


def _die_at_create(monkeypatch: pytest.MonkeyPatch, number: int, *, after: bool) -> None:
    """Make the ``number``-th ``create_batch`` kill the try, before or after the batch is made."""
    real = BatchHook.create_batch
    calls = {"n": 0}

    def dying(self: BatchHook, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == number and not after:
            raise RuntimeError("worker died")
        batch = real(self, **kwargs)
        if calls["n"] == number:
            raise RuntimeError("worker died")
        return batch

    monkeypatch.setattr(BatchHook, "create_batch", dying)


def _made(emu: Emulator) -> tuple[int, int, int]:
    stats = emu.stats("dashscope")
    return stats["files_uploaded"], stats["batches_created"], stats["files"]


@pytest.mark.parametrize("store", STORES)
def test_a_retry_that_would_not_fit_is_refused_before_it_uploads(
    connect: Any, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", 9997)
    state = state_store(store)
    _die_at_create(monkeypatch, 1, after=True)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    monkeypatch.undo()
    connect("dashscope")
    hold_files(emu, "dashscope", 2)  # meanwhile another job fills the account
    assert _made(emu) == (1, 1, 10_000)

    with pytest.raises(InvalidInputError, match="at most 10000 batch files") as info:
        parts_op().execute(make_context(FakeTI(), state))

    assert "holds 10000 and this job needs 2 more (1 uploaded by an earlier try)" in str(info.value)
    assert _made(emu) == (1, 1, 10_000)


@pytest.mark.parametrize("store", STORES)
def test_a_retry_of_a_job_that_fitted_reuses_its_uploads_and_is_not_refused(
    connect: Any, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", 9997)
    state = state_store(store)
    _die_at_create(monkeypatch, 2, after=False)  # parts 1 and 2 uploaded, part 2 not created
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op().execute(make_context(FakeTI(), state))
    monkeypatch.undo()
    connect("dashscope")
    assert _made(emu) == (2, 1, 9999)

    result = parts_op().execute(make_context(FakeTI(), state))

    assert len(result["batch_ids"]) == 3
    assert _made(emu) == (3, 3, 10_000)


def test_without_reattach_a_retry_counts_every_part(connect: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    emu = connect("dashscope")
    hold_files(emu, "dashscope", 9996)
    state = state_store("state_store")
    _die_at_create(monkeypatch, 2, after=False)
    with pytest.raises(RuntimeError, match="worker died"):
        parts_op(reattach=False).execute(make_context(FakeTI(), state))
    monkeypatch.undo()
    connect("dashscope")

    # reattach=False uploads every part again: 9,998 held and three more do not fit.
    with pytest.raises(InvalidInputError, match=r"holds 9998 and this job needs 3 more\."):
        parts_op(reattach=False).execute(make_context(FakeTI(), state))
    assert _made(emu) == (2, 1, 9998)


@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_the_quota_count_lists_the_vendors_largest_pages(connect: Any, vendor: str) -> None:
    emu = connect(vendor)
    hold_files(emu, vendor, 250)
    spec = REGISTRY[vendor]
    largest = spec.file_list.max_limit if "limit" in spec.file_list.params else None

    with BatchHook(CONN_ID) as hook:
        hook.check_file_quota(1)
        assert len(list(hook.list_files())) == 250

    calls = emu.stats(vendor)["operations"].get("list_files", 0)
    per_listing = math.ceil(250 / largest) if largest else 1
    assert calls == per_listing * (2 if spec.limits.max_batch_files else 1)
