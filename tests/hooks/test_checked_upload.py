"""
``upload_file(..., check=...)``: the request file is checked as it streams into the upload, in one pass.

A chunk goes out only once the lines it completes passed; the last chunk and the closing boundary only
once the whole file passed. A problem aborts the request with its body unfinished and raises every
problem of the file, as ``validate_request_file`` lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.exceptions import InvalidRequestFileError
from airflow_provider_llmbatch.hooks import _io
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import RequestFileCheck, validate_request_file
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

CHUNK = _io.CHECKED_CHUNK_SIZE
LINE_BYTES = 1024


def _line(spec: VendorSpec, n: int, **body: Any) -> bytes:
    content = f"question {n} " + "x" * LINE_BYTES
    full = {"model": "test-model", "messages": [{"role": "user", "content": content}], **body}
    full = {k: v for k, v in full.items() if v is not None}
    line = {"custom_id": f"r{n}", "method": "POST", "url": spec.default_endpoint, "body": full}
    return json.dumps(line, separators=(",", ":")).encode()


def write_file(
    path: Path, spec: VendorSpec, lines: int, *, no_model: tuple[int, ...] = (), end: bytes = b"\n"
) -> Path:
    """Write ``lines`` requests of about 1 KB; the 1-based lines in ``no_model`` lack body.model."""
    rows = [_line(spec, n, model=None) if n in no_model else _line(spec, n) for n in range(1, lines + 1)]
    path.write_bytes(b"\n".join(rows) + end)
    return path


def line_at(path: Path, offset: int) -> int:
    """Return the 1-based number of the line holding byte ``offset``."""
    return path.read_bytes()[:offset].count(b"\n") + 1


def _file_json(file_id: str, size: int, name: str = "requests.jsonl") -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "filename": name, "purpose": "batch"}


class Recorder(httpx.BaseTransport):
    """Take upload bodies chunk by chunk, as a server does, and keep what arrived of each."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [200])
        self.bodies: list[bytearray] = []
        self.keep = True
        self.received = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = bytearray()
        self.bodies.append(body)
        for chunk in request.stream:  # type: ignore[union-attr]
            self.received += len(chunk)
            if self.keep:
                body += chunk
        status = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "try again"}})
        return httpx.Response(200, json=_file_json("file-1", self.received))


@pytest.fixture
def recorder_hook(transport_hook: Callable[..., BatchHook]) -> Callable[..., tuple[BatchHook, Recorder]]:
    def make(vendor: str = "openai", answers: list[int] | None = None) -> tuple[BatchHook, Recorder]:
        recorder = Recorder(answers)
        return transport_hook(recorder, vendor), recorder

    return make


def _sha_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llmbatch-sha256" and t.is_alive()]


# -- against a transport that records what arrived ---------------------------------------------------


@pytest.mark.parametrize("end", [b"\n", b""], ids=["final-newline", "no-final-newline"])
def test_good_file_goes_out_whole_with_the_report_validate_gives(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path, end: bytes
) -> None:
    spec = REGISTRY["openai"]
    path = write_file(tmp_path / "requests.jsonl", spec, 3500, end=end)  # about 3.7 MB: four chunks
    hook, recorder = recorder_hook()
    check = RequestFileCheck(spec)

    uploaded = hook.upload_file(path, check=check)

    [body] = recorder.bodies
    assert body.endswith(b"--\r\n")
    assert path.read_bytes() in body
    assert uploaded.bytes == len(body)
    assert check.report == validate_request_file(path, spec)
    assert check.report is not None
    assert check.report.lines == 3500


def test_problem_mid_file_aborts_before_its_chunk_and_lists_every_problem(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    # Bad lines in the third chunk and near the end of a five-chunk file.
    bad_early = line_at(write_file(tmp_path / "requests.jsonl", spec, 4800), 2 * CHUNK + 100)
    path = write_file(tmp_path / "requests.jsonl", spec, 4800, no_model=(bad_early, 4790))
    hook, recorder = recorder_hook()

    with pytest.raises(InvalidRequestFileError) as info:
        hook.upload_file(path, check=RequestFileCheck(spec))

    with pytest.raises(InvalidRequestFileError) as separately:
        validate_request_file(path, spec)
    assert info.value.problems == separately.value.problems
    assert [p.split(":")[0] for p in info.value.problems] == [f"line {bad_early}", "line 4790"]
    assert "body.model: expected a non-empty string" in info.value.problems[0]
    [body] = recorder.bodies
    # The request had started; it got at most the chunks before the one with the first problem.
    assert 0 < len(body) < 2 * CHUNK + 1024
    assert not body.endswith(b"--\r\n")
    assert _sha_threads() == []


def test_problem_seen_only_at_the_end_holds_back_the_last_bytes(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    lines = write_file(tmp_path / "requests.jsonl", spec, 3000).read_bytes().split(b"\n")[:-1]
    lines.append(lines[10])  # the last line repeats custom_id r11, with no newline after it
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(lines))
    hook, recorder = recorder_hook()

    with pytest.raises(InvalidRequestFileError, match="line 3001: custom_id") as info:
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert "it is on line 11 already" in info.value.problems[0]
    [body] = recorder.bodies
    size = len(path.read_bytes())
    assert len(body) < size - (size % CHUNK or CHUNK) + 1024  # the last chunk never went
    assert not body.endswith(b"--\r\n")


def test_file_level_limit_stops_the_upload_early(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    small = dataclasses.replace(spec, limits=dataclasses.replace(spec.limits, max_file_bytes=2 * CHUNK))
    path = write_file(tmp_path / "requests.jsonl", spec, 6000)  # about 6.3 MB
    hook, recorder = recorder_hook()

    with pytest.raises(InvalidRequestFileError, match="file: bytes: expected at most 2097152 bytes"):
        hook.upload_file(path, check=RequestFileCheck(small))

    [body] = recorder.bodies
    assert len(body) <= 2 * CHUNK + 1024


@pytest.mark.parametrize("lines", [3, 900], ids=["tiny", "under-a-chunk"])
def test_file_that_fits_a_chunk_is_checked_whole_before_any_request(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path, lines: int
) -> None:
    spec = REGISTRY["zhipu"]
    path = write_file(tmp_path / "requests.jsonl", spec, lines, no_model=(lines,))
    hook, recorder = recorder_hook("zhipu")

    with pytest.raises(InvalidRequestFileError, match=rf"line {lines}: body\.model"):
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert recorder.bodies == []


def test_problem_in_the_first_chunk_of_a_large_file_sends_no_request(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["moonshot"]
    path = write_file(tmp_path / "requests.jsonl", spec, 5000, no_model=(2, 4999))
    hook, recorder = recorder_hook("moonshot")

    with pytest.raises(InvalidRequestFileError) as info:
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert [p.split(":")[0] for p in info.value.problems] == ["line 2", "line 4999"]
    assert recorder.bodies == []


def test_wrong_name_sends_no_request(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    path = write_file(tmp_path / "requests.txt", spec, 3)
    hook, recorder = recorder_hook()

    with pytest.raises(
        InvalidRequestFileError, match=r"file: name: expected a file name ending in '\.jsonl'"
    ):
        hook.upload_file(path, filename="requests.jsonl", check=RequestFileCheck(spec))

    assert recorder.bodies == []


def test_empty_file_sends_no_request(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"")
    hook, recorder = recorder_hook()

    with pytest.raises(
        InvalidRequestFileError, match="file: lines: expected at least one request, got an empty file"
    ):
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert recorder.bodies == []


@pytest.mark.parametrize("outcome", ["passes", "fails mid-file", "server refuses"])
def test_no_thread_outlives_the_attempt(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path, outcome: str
) -> None:
    spec = REGISTRY["openai"]
    no_model = (2500,) if outcome == "fails mid-file" else ()
    path = write_file(tmp_path / "requests.jsonl", spec, 4000, no_model=no_model)
    hook, _ = recorder_hook(answers=[400] if outcome == "server refuses" else [200])

    with contextlib.suppress(Exception):
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert _sha_threads() == []


def test_read_error_mid_file_reaches_the_caller(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    path = write_file(tmp_path / "requests.jsonl", spec, 4000)
    hook, recorder = recorder_hook()

    class Failing(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() >= 2 * CHUNK:
                raise OSError("disk went away")
            return super().read(size)

    with pytest.raises(OSError, match="disk went away"):
        hook.upload_file(Failing(path.read_bytes()), filename="requests.jsonl", check=RequestFileCheck(spec))

    # The body never ended: what arrived is short of the file, and no thread is left behind.
    assert len(recorder.bodies) == 1
    assert len(recorder.bodies[0]) < path.stat().st_size
    assert _sha_threads() == []


def test_repeated_attempt_checks_the_file_again(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    path = write_file(tmp_path / "requests.jsonl", spec, 2500)
    hook, recorder = recorder_hook(answers=[429, 200])
    check = RequestFileCheck(spec)

    hook.upload_file(path, check=check)

    assert len(recorder.bodies) == 2
    assert recorder.bodies[0] == recorder.bodies[1]
    assert check.report == validate_request_file(path, spec)


@pytest.mark.parametrize("kind", ["fileobj", "storage"])
def test_checked_upload_of_each_source_kind(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path, kind: str
) -> None:
    from airflow.sdk import ObjectStoragePath

    spec = REGISTRY["dashscope"]
    good = write_file(tmp_path / "good.jsonl", spec, 3000)
    bad = write_file(tmp_path / "bad.jsonl", spec, 3000, no_model=(2999,))
    hook, recorder = recorder_hook("dashscope")
    opened = contextlib.ExitStack()  # a file object is the caller's to close, never the hook's

    def source(path: Path) -> Any:
        if kind == "fileobj":
            return opened.enter_context(path.open("rb"))
        return ObjectStoragePath(f"file://{path}")

    check = RequestFileCheck(spec)
    with opened:
        hook.upload_file(source(good), filename="good.jsonl", check=check)
        assert check.report is not None
        assert check.report.sha256 == validate_request_file(good, spec).sha256
        with pytest.raises(InvalidRequestFileError, match=r"line 2999: body\.model") as info:
            hook.upload_file(source(bad), filename="bad.jsonl", check=RequestFileCheck(spec))
    if kind == "storage":
        assert info.value.source == f"file://{bad}"
    assert good.read_bytes() in recorder.bodies[0]
    assert not recorder.bodies[1].endswith(b"--\r\n")


def test_checked_upload_memory_stays_flat(
    recorder_hook: Callable[..., tuple[BatchHook, Recorder]], tmp_path: Path
) -> None:
    spec = REGISTRY["openai"]
    path = write_file(tmp_path / "requests.jsonl", spec, 24_000)  # about 25 MB
    hook, recorder = recorder_hook()
    recorder.keep = False
    tracemalloc.start()
    try:
        hook.upload_file(path, check=RequestFileCheck(spec))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert recorder.received > path.stat().st_size
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak} bytes for a {path.stat().st_size}-byte file"


# -- against the emulator --------------------------------------------------------------------------------


def _fragments(emulator: Emulator, vendor: str) -> list[Path]:
    state = emulator.runtime.store.vendor(vendor)
    owned = {record.path for record in state.files.values()}
    return [path for path in state.root.iterdir() if path.is_file() and path not in owned]


def _no_fragments_soon(emulator: Emulator, vendor: str) -> list[Path]:
    deadline = time.monotonic() + 5
    while _fragments(emulator, vendor) and time.monotonic() < deadline:
        time.sleep(0.01)
    return _fragments(emulator, vendor)


@pytest.mark.integration
@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_bad_line_near_the_end_leaves_no_file_and_the_emulator_goes_on(
    emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path, vendor: str
) -> None:
    spec = REGISTRY[vendor]
    path = write_file(tmp_path / "requests.jsonl", spec, 5000, no_model=(4995,))  # about 5 MB
    hook = emulator_hook(vendor)

    with pytest.raises(InvalidRequestFileError) as info:
        hook.upload_file(path, check=RequestFileCheck(spec))

    assert info.value.problems == [
        "line 4995: body.model: expected a non-empty string, got nothing (the key is missing)"
    ]
    assert info.value.source == str(path)
    assert list(hook.list_files()) == []
    stats = emulator.stats(vendor)
    assert stats["operations"]["upload"] == 1  # started, then aborted with its body unfinished
    assert (stats["files_uploaded"], stats["files"]) == (0, 0)
    assert _no_fragments_soon(emulator, vendor) == []
    # The emulator (and the hook) go on: the next upload is stored, and it is the only file.
    good = write_file(tmp_path / "good.jsonl", spec, 5000)
    check = RequestFileCheck(spec)
    uploaded = hook.upload_file(good, check=check)
    assert [f.id for f in hook.list_files()] == [uploaded.id]
    assert emulator.file_path(vendor, uploaded.id).read_bytes() == good.read_bytes()
    assert check.report == validate_request_file(good, spec)


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["500", "reset_after"])
def test_checked_upload_through_faults_stores_one_file(
    emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path, fault: str
) -> None:
    spec = REGISTRY["zhipu"]
    path = write_file(tmp_path / "requests.jsonl", spec, 2500)
    hook = emulator_hook("zhipu", retry_policy=RetryPolicy(max_retries=2, sleep=lambda seconds: None))
    emulator.add_fault(FaultRule(fault, vendor="zhipu", operation="upload", times=1))  # type: ignore[arg-type]
    check = RequestFileCheck(spec)

    uploaded = hook.upload_file(path, filename="mine.jsonl", check=check)

    stats = emulator.stats("zhipu")
    assert stats["files_uploaded"] == 1
    assert [f.id for f in hook.list_files()] == [uploaded.id]
    assert emulator.file_path("zhipu", uploaded.id).read_bytes() == path.read_bytes()
    assert check.report == validate_request_file(path, spec)
