"""
Hardening, files: a location that cannot be read as a file is refused at once, naming what to do.

Class 12: an object-storage URI whose filesystem is not installed names the extra (or provider) to
install, at every place a location is taken. Class 13: a path that is not a regular file (a device, a
FIFO, a folder, a socket, a link to one, a link loop) is refused instead of read for ever or waited on
for ever; every call runs under a bound, so a hang fails the test instead of stalling the suite. Each
case goes through the operators against the emulator and checks that nothing reached the vendor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow_env import unavailable
from relkit import bounded, write_request_file

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.jsonl import build_request_file, validate_request_file
from airflow_provider_llmbatch.locations import FILESYSTEM_EXTRAS
from airflow_provider_llmbatch.operators.batch import CreateBatchOperator
from airflow_provider_llmbatch.operators.results import FetchBatchResultsOperator
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.operators.conftest import FakeStateStore, FakeTI, make_context

pytestmark = pytest.mark.integration

VENDOR = "openai"
RECORDS = [{"custom_id": "a", "prompt": "hi"}]
Entry = Callable[[str, str, str, Path], Any]
"""An entry point taking a location: (location, conn_id, a finished batch id, a scratch folder)."""


@pytest.fixture(autouse=True)
def _operators_run_outside_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.bases.operator import ExecutorSafeguard

    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture
def conn_id(rel_conn: Callable[..., str]) -> str:
    return rel_conn(VENDOR, max_retries=0)


@pytest.fixture
def finished(emulator: Emulator, conn_id: str, tmp_path: Path) -> str:
    """A completed batch, for the fetch: its output is downloaded before the input is read."""
    with BatchHook(conn_id) as hook:
        uploaded = hook.upload_file(write_request_file(tmp_path / "requests.jsonl", REGISTRY[VENDOR], 2))
        batch_id = hook.create_batch(input_file_id=uploaded.id).id
    emulator.force_status(VENDOR, batch_id, "completed")
    return batch_id


def _uploaded(emulator: Emulator) -> int:
    return int(emulator.stats(VENDOR)["files_uploaded"])


@pytest.fixture
def refused(conn_id: str, finished: str, tmp_path: Path) -> Callable[[Entry, str], InvalidInputError]:
    """Return the error an entry point refuses ``location`` with; fail if it returns or runs past 30 s."""

    def attempt(entry: Entry, location: str) -> InvalidInputError:
        with pytest.raises(InvalidInputError) as info:
            # A FIFO opened waits for the other end, /dev/zero never ends: the bound makes either a failure
            # instead of a stalled suite.
            bounded(lambda: entry(location, conn_id, finished, tmp_path), seconds=30)
        return info.value

    return attempt


# Every place a location is taken; each returns what the call returned (the operators: their result).
ENTRY_POINTS: dict[str, Entry] = {
    "create, first try (checked as it uploads)": lambda uri, conn, batch, tmp: CreateBatchOperator(
        task_id="create", conn_id=conn, input_file=uri
    ).execute(make_context(FakeTI(), FakeStateStore())),
    "create, retry (checked, then uploaded)": lambda uri, conn, batch, tmp: CreateBatchOperator(
        task_id="create", conn_id=conn, input_file=uri
    ).execute(make_context(FakeTI())),
    "fetch, its input": lambda uri, conn, batch, tmp: FetchBatchResultsOperator(
        task_id="fetch", conn_id=conn, batch_id=batch, input_file=uri, destination=str(tmp / "out.jsonl")
    ).execute(make_context(FakeTI())),
    "hook upload": lambda uri, conn, batch, tmp: _hook_upload(conn, uri),
    "validate_request_file": lambda uri, conn, batch, tmp: validate_request_file(uri, VENDOR),
}
WRITING: dict[str, Entry] = {
    "create from requests, kept there": lambda uri, conn, batch, tmp: CreateBatchOperator(
        task_id="create", conn_id=conn, requests=RECORDS, model="m", request_file_destination=uri
    ).execute(make_context(FakeTI())),
    "hook download": lambda uri, conn, batch, tmp: _hook_download(conn, batch, uri),
    "fetch, its destination": lambda uri, conn, batch, tmp: FetchBatchResultsOperator(
        task_id="fetch", conn_id=conn, batch_id=batch, input_file=str(_requests(tmp)), destination=uri
    ).execute(make_context(FakeTI())),
    "build_request_file": lambda uri, conn, batch, tmp: build_request_file(RECORDS, uri, VENDOR, model="m"),
}


def _hook_upload(conn_id: str, location: str) -> Any:
    """Upload as a DAG's own task would: a path as it is, a URI as the ObjectStoragePath it makes of it."""
    from airflow.sdk import ObjectStoragePath

    with BatchHook(conn_id) as hook:
        return hook.upload_file(ObjectStoragePath(location) if "://" in location else location)


def _hook_download(conn_id: str, batch_id: str, location: str) -> Any:
    from airflow.sdk import ObjectStoragePath

    with BatchHook(conn_id) as hook:
        output = hook.get_batch(batch_id).output_file_id
        assert output
        return hook.download_file(output, ObjectStoragePath(location) if "://" in location else location)


def _requests(tmp: Path) -> Path:
    return write_request_file(tmp / "input.jsonl", REGISTRY[VENDOR], 2)


# -- class 12: a filesystem that is not installed --------------------------------------------------------

SCHEMES = [*FILESYSTEM_EXTRAS, "abfs", "hdfs", "oci", "nosuchfs"]
"""Every scheme with an extra of this package; schemes of other providers; a scheme nobody registers."""
UNBUILDABLE = {"oci", "nosuchfs"}
"""Schemes no ObjectStoragePath can even be made for (fsspec refuses at once): a hook is never handed one."""
CASES_12 = [
    (scheme, entry)
    for scheme in SCHEMES
    for entry in sorted({**ENTRY_POINTS, **WRITING})
    if not (entry.startswith("hook ") and scheme in UNBUILDABLE)
]


def _install_hint(scheme: str) -> str:
    extra = FILESYSTEM_EXTRAS.get(scheme)
    if extra:
        return f"pip install 'airflow-provider-llmbatch[{extra}]'"
    return f"the Airflow provider that registers the {scheme}:// filesystem"


@pytest.fixture
def not_installed(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Take a scheme's filesystem away, as on a machine without its extra, whatever this one has installed."""
    from airflow.sdk.io import fs, store

    registered = fs._register_filesystems()

    def remove(scheme: str) -> None:
        monkeypatch.setattr(
            fs, "_register_filesystems", lambda: {k: v for k, v in registered.items() if k != scheme}
        )
        monkeypatch.setattr(store, "_STORE_CACHE", {})

    return remove


@pytest.mark.parametrize(("scheme", "entry"), CASES_12)
def test_a_missing_filesystem_names_what_to_install(
    scheme: str,
    entry: str,
    not_installed: Callable[[str], None],
    emulator: Emulator,
    refused: Callable[[Entry, str], InvalidInputError],
    tmp_path: Path,
) -> None:
    not_installed(scheme)
    before = _uploaded(emulator)
    message = str(refused({**ENTRY_POINTS, **WRITING}[entry], f"{scheme}://bucket/folder/requests.jsonl"))
    assert f"no filesystem for {scheme}:// is installed" in message
    assert _install_hint(scheme) in message
    assert _uploaded(emulator) == before, "nothing uploaded"
    assert not (tmp_path / "out.jsonl").exists(), "nothing landed"


# -- class 13: a path that is not a regular file -----------------------------------------------------------
#
# Readers get real devices (reading one is harmless); writers only ever get nodes made in a private folder:
# a writer that renamed its file over /dev/null would delete the machine's /dev/null.


@pytest.fixture(scope="module")
def odd_files() -> Iterator[dict[str, str]]:
    """Paths of every kind that is not a regular file, in a short folder (a socket's path has a limit)."""
    folder = Path(tempfile.mkdtemp(prefix="llmb-"))
    fifo, sock, device = folder / "fifo.jsonl", folder / "sock.jsonl", folder / "device.jsonl"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    made = {"a FIFO": fifo, "a socket": sock, "a folder": folder / "folder.jsonl"}
    made["a folder"].mkdir()
    with contextlib.suppress(PermissionError):  # a private character device (as /dev/null is) needs root
        os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        made["a device"] = device
    links = {
        "a link to /dev/zero": "/dev/zero",
        "a link to /dev/urandom": "/dev/urandom",
        "a link to /dev/null": "/dev/null",
        "a link to a FIFO": str(fifo),
        "a link to a folder": str(made["a folder"]),
        "a link loop": str(folder / "loop.jsonl"),
    }
    for number, (kind, to) in enumerate(links.items()):
        link = folder / ("loop.jsonl" if kind == "a link loop" else f"link-{number}.jsonl")
        os.symlink(to, link)
        made[kind] = link
    made["a missing file"] = folder / "missing.jsonl"
    try:
        yield {kind: str(path) for kind, path in made.items()}
    finally:
        _release(fifo)
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


def _release(fifo: Path) -> None:
    """Give a reader blocked on the FIFO its end of file (only after a failure: nothing should block)."""
    with contextlib.suppress(OSError):  # nobody reading: the expected case
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


READ_KINDS = [
    "/dev/zero",
    "/dev/urandom",
    "/dev/null",
    "a FIFO",
    "a folder",
    "a socket",
    "a device",
    "a link to /dev/zero",
    "a link to /dev/urandom",
    "a link to /dev/null",
    "a link to a FIFO",
    "a link to a folder",
    "a link loop",
    "a missing file",
]
WRITE_KINDS = [
    "a FIFO",
    "a folder",
    "a socket",
    "a device",
    "a link to a FIFO",
    "a link to a folder",
    "a link loop",
]
REASONS = {"a missing file": "no such file", "a link loop": "cannot "}


def _location(odd_files: dict[str, str], kind: str, form: str) -> tuple[str, str]:
    if kind not in odd_files and not kind.startswith("/dev/"):
        unavailable(f"{kind} needs root to make (CI runs as root)")
    path = odd_files.get(kind, kind)
    return path, path if form == "path" else f"file://{path}"


CASES_13 = [
    pytest.param(kind, entry, form, id=f"{kind}-{entry}-{form}")
    for entries, kinds in ((ENTRY_POINTS, READ_KINDS), (WRITING, WRITE_KINDS))
    for kind in kinds
    for entry in sorted(entries)
    for form in ("path", "file:// URI")
]
"""Every reader with every kind; every writer with the kinds made in the private folder only."""


@pytest.mark.parametrize(("kind", "entry", "form"), CASES_13)
def test_what_is_not_a_regular_file_is_neither_read_nor_written_over(
    kind: str,
    entry: str,
    form: str,
    odd_files: dict[str, str],
    emulator: Emulator,
    refused: Callable[[Entry, str], InvalidInputError],
) -> None:
    path, location = _location(odd_files, kind, form)
    node = os.lstat(path) if os.path.lexists(path) else None
    before = _uploaded(emulator)
    message = str(refused({**ENTRY_POINTS, **WRITING}[entry], location))
    if kind.startswith("/dev/"):
        # Named without .jsonl: a check may refuse the name first; either way it is refused unread.
        assert path in message
    else:
        assert f"{path}: {REASONS.get(kind, 'not a regular file')}" in message
    assert _uploaded(emulator) == before, "nothing uploaded"
    if entry in WRITING:
        assert node is not None
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (node.st_mode, node.st_ino, node.st_rdev), (
            "left as it was: not replaced, not removed"
        )
        assert [p.name for p in Path(path).parent.glob(".*")] == [], "no temporary left beside it"
