"""What the emulator stores about files and batches, independent of any vendor's dialect."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

FileKind = Literal["input", "output", "error"]


def new_id(prefix: str) -> str:
    """Return a fresh id with ``prefix``."""
    return f"{prefix}{uuid.uuid4().hex}"


def new_request_id() -> str:
    """Return a fresh request id."""
    return f"req-{secrets.token_hex(12)}"


@dataclass
class Problem:
    """
    One problem of a request file, shaped like an item of a batch's ``errors.data``.

    :param code: a short machine-readable code.
    :param message: what is wrong and what was expected.
    :param line: the 1-based line number, if the problem belongs to a line.
    :param param: the field at fault, if any.
    """

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the problem as the ``errors.data`` item vendors send."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass
class FileInfo:
    """
    What one streaming pass over a request file found.

    :param lines: request lines (blank lines excluded).
    :param bytes: the file's size.
    :param model: the one model of the file (the first seen).
    :param url: the one ``url`` of the file (the first seen).
    :param problems: problems found, capped.
    :param fail_flags: per request line, 1 when its ``custom_id`` is to fail, 2 when it fails rate limited.
    """

    lines: int = 0
    bytes: int = 0
    model: str | None = None
    url: str | None = None
    problems: list[Problem] = field(default_factory=list)
    fail_flags: bytearray = field(default_factory=bytearray)


@dataclass
class FileRecord:
    """
    A stored file.

    :param id: the vendor-facing id.
    :param filename: the name given at upload.
    :param purpose: the purpose given at upload, or ``batch_output``.
    :param bytes: the size on disk.
    :param created_at: epoch seconds.
    :param path: where the content lives.
    :param kind: input, output or error.
    :param seq: insertion order, for stable newest-first listing.
    :param info: the validation pass made at upload, where the vendor validates there.
    """

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    path: Path
    kind: FileKind
    seq: int
    info: FileInfo | None = None


@dataclass
class BatchRecord:
    """
    A batch and its schedule.

    :param id: the vendor-facing id.
    :param endpoint: the batch endpoint.
    :param input_file_id: the request file.
    :param input_path: the request file's content (kept while the batch needs it).
    :param completion_window: as requested.
    :param metadata: as requested.
    :param extra: vendor-only create fields, as requested.
    :param created_at: epoch seconds.
    :param expires_at: epoch seconds when the completion window runs out.
    :param seq: insertion order.
    :param info: the validation pass over the request file.
    :param outcome: the end forced with the ``emulator_outcome`` metadata key.
    """

    id: str
    endpoint: str
    input_file_id: str
    input_path: Path
    completion_window: str | None
    metadata: dict[str, str] | None
    extra: dict[str, Any]
    created_at: float
    expires_at: float
    seq: int
    info: FileInfo
    outcome: str | None = None
    status: str = "validating"
    phase_started_at: float = 0.0
    held: bool = False
    processed: int = 0
    processed_at_phase_start: int = 0
    unfinished_failed: int = 0
    times: dict[str, float] = field(default_factory=dict)
    errors: list[Problem] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_written: bool = False

    @property
    def total(self) -> int:
        """Return the number of requests in the batch."""
        return len(self.info.fail_flags)

    @property
    def failed(self) -> int:
        """Return failed requests so far."""
        return self._failed_processed() + self.unfinished_failed

    @property
    def completed(self) -> int:
        """Return succeeded requests so far."""
        return self.processed - self._failed_processed()

    def _failed_processed(self) -> int:
        done = self.info.fail_flags[: self.processed]
        return len(done) - done.count(0)
