"""
Adversarial cases for parts sent as spans of a local input.

The first tests pin down that a span sends exactly what a part file used to (checked against the same
input read as a file object, which still goes to part files, and against a model of the old design),
and that the input is never touched. The rest are the defects a review found, each fixed: a rewrite that
keeps the size and mtime (a new inode, a new ctime), a change between upload attempts, a change caught
at part k (the parts before it are cancelled), a part file that cannot be created or an interrupt then
(their own error, with the clean-up), a deleted input (refused as changed).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

import airflow_provider_llmbatch.parts as parts_module
from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import build_request_file
from airflow_provider_llmbatch.parts import Part, split_checked
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import (
    CONN_ID,
    DS_TEST,
    DS_TEST_MODEL,
    FakeStateStore,
    FakeTI,
    _operators_run_outside_task_runner,  # noqa: F401 - autouse
    make_context,
    parts_op,
    records,
)

SPEC = REGISTRY["zhipu"]


def _line(n: int, pad: int = 0) -> bytes:
    body = {"model": "m-1", "messages": [{"role": "user", "content": "x" * pad + f"review {n}"}]}
    return json.dumps(
        {"custom_id": f"r-{n}", "method": "POST", "url": SPEC.default_endpoint, "body": body}
    ).encode()


def _read(part: Part) -> bytes:
    with part.open() as reader:
        return reader.read()


def _old_design(raw: bytes, max_requests: int, max_bytes: int) -> list[bytes]:
    """What part files held: each line, a CR before its newline dropped, a newline ensured, grouped."""
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    current, count = b"", 0
    for line in lines:
        sent = line.rstrip(b"\r") + b"\n"
        if current and (count + 1 > max_requests or len(current) + len(sent) > max_bytes):
            out.append(current)
            current, count = b"", 0
        current, count = current + sent, count + 1
    return [*out, current] if current else out


L = [_line(n, pad) for n, pad in enumerate([0, 7, 0, 30, 2, 0])]
# Room for the longest line (with a space and its newline) and no second: one line a part. A line over a
# part's bytes is refused by its line (tests/test_parts_line_fits.py), never sent in a part of its own.
ONE = max(map(len, L)) + 2
CASES = {
    "crlf in the first line": L[0] + b"\r\n" + b"\n".join(L[1:]) + b"\n",
    "crlf in the middle of a part": b"\n".join(L[:2]) + b"\n" + L[2] + b"\r\n" + b"\n".join(L[3:]) + b"\n",
    "crlf at a part boundary": b"\n".join(L[:3]) + b"\r\n" + b"\n".join(L[3:]) + b"\n",
    "crlf only on the last line": b"\n".join(L) + b"\r\n",
    "no final newline": b"\n".join(L),
    "no final newline, a lone cr": b"\n".join(L) + b"\r",
    "crlf everywhere, no final newline": b"\r\n".join(L) + b"\r",
    "one line": L[0] + b"\n",
    "one line, no newline": L[0],
    "one crlf line": L[0] + b"\r\n",
    "space before the newline": b"\n".join(line + b" " for line in L) + b"\n",
}


@pytest.mark.parametrize("chunk", [1, 97, 1 << 20])
@pytest.mark.parametrize("limits", [(3, 10**6), (50, ONE), (50, 10**6), (2, 3 * ONE + 40)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_spans_send_what_part_files_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, limits: tuple[int, int], chunk: int
) -> None:
    monkeypatch.setattr(parts_module, "chunk_bytes", lambda: chunk)  # lines and blocks across chunks
    raw = CASES[case]
    source = tmp_path / "requests.jsonl"
    source.write_bytes(raw)
    max_requests, max_bytes = limits

    local = split_checked(source, SPEC, folder=tmp_path / "a", max_requests=max_requests, max_bytes=max_bytes)
    stream = split_checked(
        io.BytesIO(raw), SPEC, folder=tmp_path / "b", max_requests=max_requests, max_bytes=max_bytes
    )

    sent = [_read(p) for p in local.parts]
    assert sent == [_read(p) for p in stream.parts] == _old_design(raw, max_requests, max_bytes)
    assert [p.bytes for p in local.parts] == [len(s) for s in sent]
    assert source.read_bytes() == raw


# -- defects found by review, fixed ------------------------------------------------------------------


def test_a_rewrite_keeping_size_and_mtime_is_sent_unchecked(tmp_path: Path) -> None:
    # cp -p, rsync -t, tar x, or a 1-2 s mtime (FAT, HFS+, some NFS): size and mtime match, the inode
    # and ctime do not.
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(L) + b"\n")
    split = split_checked(source, SPEC, folder=tmp_path / "parts")
    before = source.stat()
    changed = source.read_bytes().replace(b'"r-1"', b'"r-0"')  # now a duplicate id, never checked
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(changed)
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, source)  # a new inode and a new ctime

    with pytest.raises(InvalidInputError, match="changed after it was checked"):
        _read(split.parts[0])


def test_a_change_between_upload_attempts_is_sent(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retried attempt rewinds the reader, which checks the file again: here the input is rewritten
    # while the hook sleeps before its retry.
    source = tmp_path / "requests.jsonl"
    checked = b"\n".join(L) + b"\n"
    source.write_bytes(checked)
    split = split_checked(source, SPEC, folder=tmp_path / "parts")

    def rewrite_the_input(seconds: float) -> None:
        source.write_bytes(checked.replace(b"review 1", b"review 9"))

    for key, value in emulator.airflow_conn_env("zhipu", "adv_zhipu").items():
        monkeypatch.setenv(key, value)
    hook = BatchHook("adv_zhipu", retry_policy=RetryPolicy(max_retries=2, sleep=rewrite_the_input))
    emulator.add_fault(FaultRule("500", vendor="zhipu", operation="upload", times=1))
    try:
        with split.parts[0].open() as reader:
            uploaded = hook.upload_file(reader, filename="part.jsonl")
    except InvalidInputError:
        return  # refused: what the stamp is for
    assert emulator.file_path("zhipu", uploaded.id).read_bytes() == checked


def test_a_part_file_that_cannot_be_made_raises_its_own_error(tmp_path: Path) -> None:
    folder = tmp_path / "parts"
    (folder / "requests.part-0001.jsonl").mkdir(parents=True)  # the part's name is taken by a folder
    with pytest.raises(IsADirectoryError):
        split_checked(io.BytesIO(b"\n".join(L) + b"\n"), SPEC, folder=folder)


def test_an_interrupt_while_a_part_file_opens_stays_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open, opened = open, []

    def interrupted(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and opened:
            raise KeyboardInterrupt  # the second part file: Ctrl-C, or Airflow's SIGTERM handler
        if "w" in mode:
            opened.append(path)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(parts_module, "open", interrupted, raising=False)
    source = tmp_path / "requests.jsonl"
    raw = L[0] + b"\r\n" + b"\n".join(L[1:]) + b"\n"  # a CR: the local input goes to part files
    source.write_bytes(raw)
    with pytest.raises(KeyboardInterrupt):
        split_checked(source, SPEC, folder=tmp_path / "parts", max_requests=1)
    assert source.read_bytes() == raw
    assert list((tmp_path / "parts").iterdir()) == []


def test_a_deleted_input_is_refused_as_changed(tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(L) + b"\n")
    split = split_checked(source, SPEC, folder=tmp_path / "parts")
    source.unlink()
    with pytest.raises(InvalidInputError, match="changed after it was checked"):
        split.parts[0].open()


def test_a_change_after_the_first_part_leaves_its_batch_running(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Part 0 is sent and its batch created; the input then changes, and part 1 is refused. Part 0's batch
    # is cancelled: a retry checks the changed input anew (a new SHA-256, new keys) and sends every part.
    for key, value in emulator.airflow_conn_env("dashscope", CONN_ID).items():
        monkeypatch.setenv(key, value)
    source = tmp_path / "requests.jsonl"
    build_request_file(records(250), source, "dashscope", DS_TEST, model=DS_TEST_MODEL, whole_input=True)
    real_create = BatchHook.create_batch

    def create_then_edit(self: BatchHook, **kwargs: Any) -> Any:
        batch = real_create(self, **kwargs)
        source.write_bytes(source.read_bytes().replace(b"question 199", b"question 999"))
        return batch

    monkeypatch.setattr(BatchHook, "create_batch", create_then_edit)
    with pytest.raises(InvalidInputError, match="changed after it was checked"):
        parts_op(requests=None, input_file=str(source)).execute(make_context(FakeTI(), FakeStateStore()))
    running = [b for b in emulator.batches("dashscope") if b["status"] not in ("cancelling", "cancelled")]
    assert running == []
