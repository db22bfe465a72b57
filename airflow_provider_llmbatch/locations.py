"""
Where files are read from and written to: local paths, URIs and ObjectStoragePaths.

A :data:`Location` is a local path (``str`` or ``os.PathLike``), a URI such as ``s3://bucket/key.jsonl``
or ``file:///abs/path``, or an ``ObjectStoragePath`` (anything with ``.open()``). A :data:`Source` may
also be a binary file object, which is read from where it stands and left open. Local files are
opened directly; everything else through ``ObjectStoragePath`` and the filesystem behind it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeAlias, cast

from airflow_provider_llmbatch.exceptions import InvalidInputError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

Location: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath"
"""A local path, a ``file://`` or object-storage URI, or an ObjectStoragePath."""

Source: TypeAlias = "str | os.PathLike[str] | ObjectStoragePath | BinaryIO"
"""Where a file is read from: a :data:`Location`, or a binary file object (left open)."""

_FILE_SCHEME = "file://"


def is_uri(text: str) -> bool:
    """Return whether a string is a URI (``scheme://...``) rather than a local path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def label(source: object) -> str:
    """Return the name of a source for messages: its path or URI, or a file object's name."""
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    if hasattr(source, "open"):
        return str(source)
    return str(getattr(source, "name", None) or "<stream>")


def file_name(source: object) -> str | None:
    """Return the name whose extension matters, or None for an anonymous file object."""
    if isinstance(source, str | os.PathLike):
        return os.path.basename(label(source).rstrip("/"))
    if hasattr(source, "open"):
        return str(getattr(source, "name", "")) or None
    return None


def as_path(location: Location) -> Path | ObjectStoragePath:
    """Return a location as a ``Path`` when it is a local path, as an ``ObjectStoragePath`` otherwise."""
    if isinstance(location, str | os.PathLike) and not is_uri(text := os.fsdecode(location)):
        return Path(text)
    return object_path(location)


FILESYSTEM_EXTRAS: dict[str, str] = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
"""URI scheme -> the extra of this package that installs its filesystem."""


def object_path(location: Location) -> ObjectStoragePath:
    """
    Return a location as an ``ObjectStoragePath``: a path or URI is converted, one is returned as it is.

    :raises InvalidInputError: when no filesystem is installed for the URI's scheme, naming what to install.
    """
    try:
        if isinstance(location, str | os.PathLike):
            from airflow.sdk import ObjectStoragePath

            # An unknown scheme (or one whose library is missing) fails here already.
            location = ObjectStoragePath(os.fsdecode(location))
        location.fs  # noqa: B018 - resolves the filesystem now, not deep inside the first read
    except (ValueError, ImportError) as exc:
        scheme = str(location).partition("://")[0]
        extra = FILESYSTEM_EXTRAS.get(scheme)
        hint = (
            f"pip install 'airflow-provider-llmbatch[{extra}]'"
            if extra
            else f"the Airflow provider that registers the {scheme}:// filesystem"
        )
        raise InvalidInputError(
            f"{label(location)}: no filesystem for {scheme}:// is installed ({exc}); install it with {hint}"
            if extra
            else f"{label(location)}: no filesystem for {scheme}:// is installed ({exc}); install {hint}"
        ) from None
    return location


def regular_file(path: str | os.PathLike[str]) -> Path:
    """
    Return a local path after checking that it names a regular file.

    :raises InvalidInputError: for a missing file, a folder, a device (``/dev/zero``), a FIFO or a socket,
        which would never end or never start.
    """
    local = Path(os.fsdecode(path))
    try:
        mode = local.stat().st_mode
    except FileNotFoundError:
        raise InvalidInputError(f"{local}: no such file") from None
    except OSError as exc:
        raise InvalidInputError(f"{local}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise InvalidInputError(f"{local}: not a regular file (a folder, a device, a FIFO or a socket)")
    return local


def replaceable_file(path: str | os.PathLike[str]) -> Path:
    """
    Return a local destination after checking that a file may be renamed over whatever is there.

    :raises InvalidInputError: for a folder, a device (``/dev/null``), a FIFO or a socket at the path (or
        behind a link there): renaming a file over a device node would delete it for every process.
    """
    local = Path(os.fsdecode(path))
    try:
        mode = local.stat().st_mode
    except FileNotFoundError:
        return local
    except OSError as exc:
        raise InvalidInputError(f"{local}: cannot write it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise InvalidInputError(
            f"{local}: not a regular file (a folder, a device, a FIFO or a socket); name a file to write"
        )
    return local


def local_path(location: Location) -> Path | None:
    """Return the local filesystem path of a location (``file://`` URIs included), or None if it is remote."""
    if isinstance(location, str | os.PathLike):
        text = os.fsdecode(location)
        if text.startswith(_FILE_SCHEME):
            return Path(text[len(_FILE_SCHEME) :])
        return None if is_uri(text) else Path(text)
    if getattr(location, "protocol", None) in ("file", "local", ""):
        return Path(location.path)
    return None


def make_folder(folder: Any) -> None:
    """Create a folder on a local file system; object stores have no folders to create."""
    if getattr(folder, "protocol", "file") in ("file", "local", ""):
        folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def open_read(source: Source) -> Iterator[IO[bytes]]:
    """Open a source for binary reading; a file object given by the caller is left open."""
    if not (isinstance(source, str | os.PathLike) or hasattr(source, "open")):
        if not hasattr(source, "readline"):
            raise InvalidInputError(f"cannot read a request file from {type(source).__name__}")
        yield source
        return
    location = cast("Location", source)
    local = local_path(location)
    handle: IO[bytes] = (
        open(regular_file(local), "rb")  # noqa: SIM115 - closed below
        if local is not None
        else object_path(location).open("rb")  # type: ignore[no-untyped-call]
    )
    with handle:
        yield handle


def _temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_writer(destination: Location) -> Iterator[IO[bytes]]:
    """
    Open a binary writer whose bytes appear at ``destination`` only when the block succeeds.

    A local destination is written to a hidden sibling and committed with ``os.replace``; an object
    storage destination is written to a sibling key and renamed (a copy and delete on stores that have
    no rename). On error the temporary is removed and nothing new is left at ``destination``.

    :param destination: a local path, a ``file://`` URI, an object-storage URI or an ObjectStoragePath.
    """
    local = local_path(destination)
    if local is not None:
        replaceable_file(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(_temp_name(local.name))
        try:
            with open(tmp, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return
    remote = object_path(destination)
    remote_tmp = remote.parent / _temp_name(remote.name)
    try:
        with remote_tmp.open("wb") as handle:  # type: ignore[no-untyped-call]
            yield handle
        remote_tmp.rename(remote)
    finally:
        with contextlib.suppress(Exception):
            if remote_tmp.exists():
                remote_tmp.unlink()


def result_uri(destination: Location) -> str:
    """Return the URI of a location: ``file:///abs/path`` for local paths, the URI otherwise."""
    local = local_path(destination)
    if local is not None:
        # Not Path.as_uri(): it percent-encodes run ids (":" and "+"), which object-storage paths keep.
        return f"file://{local.absolute()}"
    return str(destination)
