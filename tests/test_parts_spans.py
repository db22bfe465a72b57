"""
A local input is not copied: its parts are spans of the input file, sent from it.

Lines sent otherwise than the input has them (a CR before the newline dropped, a newline added to the
last line) make part files from that point on; an input that is not a local file always goes to part
files; and a span whose file changed after the check is refused when it is opened.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from airflow_provider_llmbatch.exceptions import InvalidInputError, InvalidRequestFileError
from airflow_provider_llmbatch.parts import Part, split_checked
from airflow_provider_llmbatch.spans import PartReader
from airflow_provider_llmbatch.vendors import REGISTRY

SPEC = REGISTRY["zhipu"]


def _lines(count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "custom_id": f"r-{n}",
                "method": "POST",
                "url": SPEC.default_endpoint,
                "body": {"model": "m-1", "messages": [{"role": "user", "content": f"review {n} 配送"}]},
            },
            ensure_ascii=False,
        ).encode()
        for n in range(count)
    ]


def _read(part: Part) -> bytes:
    with part.open() as reader:
        return reader.read()


def _expected(lines: list[bytes], per_part: int) -> list[bytes]:
    return [
        b"".join(line + b"\n" for line in lines[i : i + per_part]) for i in range(0, len(lines), per_part)
    ]


def test_a_local_input_is_split_into_spans_of_itself(tmp_path: Path) -> None:
    lines = _lines(130)
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    folder = tmp_path / "parts"

    split = split_checked(source, SPEC, folder=folder, max_requests=50)

    assert [p.path for p in split.parts] == [source] * 3
    assert [p.offset for p in split.parts] == [
        0,
        split.parts[0].bytes,
        split.parts[0].bytes + split.parts[1].bytes,
    ]
    assert [_read(p) for p in split.parts] == _expected(lines, 50)
    assert list(folder.iterdir()) == []  # nothing copied


def test_a_crlf_line_makes_part_files_from_its_part_on(tmp_path: Path) -> None:
    lines = _lines(130)
    raw = [*lines[:75], lines[75] + b"\r", *lines[76:]]
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(raw) + b"\n")

    split = split_checked(source, SPEC, folder=tmp_path / "parts", max_requests=50)

    assert split.parts[0].path == source  # before the CR: still a span
    assert [p.path.parent for p in split.parts[1:]] == [tmp_path / "parts"] * 2
    assert [_read(p) for p in split.parts] == _expected(lines, 50)
    assert [p.bytes for p in split.parts] == [len(b) for b in _expected(lines, 50)]


def test_a_last_line_without_a_newline_is_sent_with_one(tmp_path: Path) -> None:
    lines = _lines(120)
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(lines))

    split = split_checked(source, SPEC, folder=tmp_path / "parts", max_requests=50)

    assert [p.path == source for p in split.parts] == [True, True, False]
    assert [_read(p) for p in split.parts] == _expected(lines, 50)


def test_an_input_that_is_not_a_local_file_goes_to_part_files(tmp_path: Path) -> None:
    lines = _lines(60)
    split = split_checked(
        io.BytesIO(b"\n".join(lines) + b"\n"), SPEC, folder=tmp_path / "parts", max_requests=50
    )

    assert all(p.path.parent == tmp_path / "parts" and p.offset == 0 for p in split.parts)
    assert [_read(p) for p in split.parts] == _expected(lines, 50)


@pytest.mark.parametrize("change", ["append", "rewrite the same size"])
def test_a_span_of_a_file_changed_after_the_check_is_refused(tmp_path: Path, change: str) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(_lines(60)) + b"\n")
    split = split_checked(source, SPEC, folder=tmp_path / "parts", max_requests=50)
    stat = source.stat()
    if change == "append":
        with source.open("ab") as handle:
            handle.write(b"\n")
    else:
        source.write_bytes(source.read_bytes().replace(b"review 1 ", b"review 9 "))
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))

    with pytest.raises(InvalidInputError, match="changed after it was checked"):
        split.parts[1].open()


def test_a_refused_input_is_left_where_it_is(tmp_path: Path) -> None:
    lines = _lines(130)
    lines[120] = b"{not json"
    source = tmp_path / "requests.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(InvalidRequestFileError, match="line 121"):
        split_checked(source, SPEC, folder=tmp_path / "parts", max_requests=50)

    assert source.read_bytes() == b"\n".join(lines) + b"\n"
    assert list((tmp_path / "parts").iterdir()) == []


def test_a_part_reader_reads_its_span_and_starts_over(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"0123456789")
    with PartReader(path, 3, 4) as reader:
        assert reader.read(2) == b"34"
        assert reader.read() == b"56"
        assert reader.read() == b""
        assert reader.seek(0, io.SEEK_END) == 4
        assert reader.seek(-10, io.SEEK_CUR) == 0
        assert reader.read(100) == b"3456"
        reader.seek(1)
        assert reader.tell() == 1
        assert reader.read() == b"456"
