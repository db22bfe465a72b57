"""
A span of a local file, read as a file of its own, that refuses a file changed since it was checked.

The parts of a split local input are spans of the input (:mod:`~airflow_provider_llmbatch.parts`): the
bytes sent are read from the file when they are sent, so the file must still be the one checked.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

from airflow_provider_llmbatch.exceptions import InputChangedError

Stamp = tuple[int, int, int, int, int]
"""What tells a file from another or from itself changed: device, inode, size, mtime and ctime (ns)."""


def stamp_of(handle: IO[bytes]) -> Stamp:
    """Return the stamp of an open file."""
    status = os.fstat(handle.fileno())
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _changed(path: Path) -> InputChangedError:
    return InputChangedError(
        f"{path} changed after it was checked; nothing is sent from the changed file "
        "(run the task again to check and send it anew)"
    )


def refuse_if_changed(path: Path, stamp: Stamp) -> None:
    """
    Raise :class:`~airflow_provider_llmbatch.exceptions.InputChangedError` unless ``path`` is the file
    stamped.
    """
    try:
        with open(path, "rb") as handle:
            same = stamp_of(handle) == stamp
    except FileNotFoundError:
        same = False
    if not same:
        raise _changed(path)


class PartReader(io.RawIOBase):
    """
    A span of a local file, read as a file of its own: positions count from the span's start.

    With a ``stamp``, the file must still be the one checked: it is compared before the first read,
    after every read and at every rewind (an upload's retry), and a file replaced, written to, cut
    or removed since raises :class:`~airflow_provider_llmbatch.exceptions.InputChangedError`.
    """

    def __init__(self, path: Path, offset: int, size: int, stamp: Stamp | None = None) -> None:
        super().__init__()
        self._file: io.BufferedReader | None = None
        self._path, self._stamp = path, stamp
        self._start, self._size, self._at = offset, size, 0
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        except FileNotFoundError:
            if stamp is None:
                raise
            raise _changed(path) from None
        self._check()
        self._file.seek(offset)

    def _check(self) -> None:
        assert self._file is not None
        if self._stamp is not None and stamp_of(self._file) != self._stamp:
            raise _changed(self._path)

    def readable(self) -> bool:
        """Return True: a span is read."""
        return True

    def seekable(self) -> bool:
        """Return True: an upload can start over."""
        return True

    def tell(self) -> int:
        """Return the position in the span."""
        return self._at

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        """Move within the span (a position past either end stops at it); return the new position."""
        assert self._file is not None
        self._check()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = min(max(base + position, 0), self._size)
        self._file.seek(self._start + self._at)
        return self._at

    def readinto(self, buffer: Any) -> int:
        """Read into ``buffer`` up to the span's end; return the bytes read (0 at the end)."""
        assert self._file is not None
        wanted = min(len(buffer), self._size - self._at)
        if wanted <= 0:
            return 0
        got = self._file.readinto(memoryview(buffer)[:wanted]) or 0
        self._check()  # after the read: bytes read before a change are the checked ones
        if not got:
            raise _changed(self._path)  # shorter than checked
        self._at += got
        return got

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
        super().close()
