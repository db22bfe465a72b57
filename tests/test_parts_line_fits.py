"""
A line is never split, so one that cannot fit in a file with its newline is refused by its line number.

On every endpoint of every vendor: the endpoint's file limit binds where it is below the vendor's line
limit (DashScope's test endpoint: 1 MiB a file, 6 MiB a line), and so does a split's smaller ``max_bytes``.
The refusal comes from the check, before any part is cut (nothing is uploaded, no part file is left).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from airflow_provider_llmbatch.exceptions import InvalidRequestFileError
from airflow_provider_llmbatch.jsonl import validate_request_file
from airflow_provider_llmbatch.jsonl_lines import RequestChecker, byte_limit
from airflow_provider_llmbatch.parts import split_checked
from airflow_provider_llmbatch.vendors import REGISTRY, EndpointSpec, VendorSpec

ENDPOINTS = [(spec, endpoint) for spec in REGISTRY.values() for endpoint in spec.endpoints]
IDS = [f"{spec.name}{endpoint.path}" for spec, endpoint in ENDPOINTS]
FILE = 600
"""A small endpoint file limit, so that a line filling a file stays small."""


def _line(endpoint: EndpointSpec, custom_id: str, size: int = 0) -> bytes:
    """Return a request line of ``size`` bytes without its newline (0: as short as it gets)."""

    def build(pad: str) -> bytes:
        body = {"model": endpoint.required_model or "m-1", "messages": [{"role": "user", "content": pad}]}
        line = {"custom_id": custom_id, "method": "POST", "url": endpoint.path, "body": body}
        return json.dumps(line).encode()

    line = build("x" * max(size - len(build("")), 0))
    assert size in (0, len(line))
    return line


def _small_files(spec: VendorSpec, endpoint: EndpointSpec) -> VendorSpec:
    """Return the vendor with ``FILE`` bytes a file on ``endpoint`` (its other limits as they are)."""
    endpoints = tuple(
        dataclasses.replace(e, max_file_bytes=FILE) if e.path == endpoint.path else e for e in spec.endpoints
    )
    return dataclasses.replace(spec, endpoints=endpoints)


@pytest.mark.parametrize(("spec", "endpoint"), ENDPOINTS, ids=IDS)
def test_every_endpoints_line_limit_leaves_room_for_the_newline_in_one_file(
    spec: VendorSpec, endpoint: EndpointSpec
) -> None:
    for whole_input in (False, True):
        checker = RequestChecker(spec, endpoint, None, whole_input=whole_input)
        assert checker.max_line_bytes + 1 <= byte_limit(spec, endpoint)


@pytest.mark.parametrize(("spec", "endpoint"), ENDPOINTS, ids=IDS)
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_line_over_the_endpoints_file_limit_is_refused_by_its_line(
    tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec, newline: bytes
) -> None:
    small = _small_files(spec, endpoint)
    source = tmp_path / "requests.jsonl"
    huge = _line(endpoint, "huge", FILE)  # FILE + 1 bytes with its newline
    source.write_bytes(
        _line(endpoint, "small") + newline + huge + newline + _line(endpoint, "after") + newline
    )
    folder = tmp_path / "parts"

    with pytest.raises(InvalidRequestFileError) as info:
        split_checked(source, small, endpoint.path, folder=folder)

    expected = (
        f"line 2: line: expected at most {FILE - 1} bytes per line (with its newline a line must fit in one "
        f"file: {FILE} bytes for {endpoint.path}), got {FILE} bytes"
    )
    assert info.value.problems == [expected]
    assert str(source) in str(info.value)
    assert list(folder.iterdir()) == []
    # The same rule on a file sent whole (and checked as it uploads).
    with pytest.raises(InvalidRequestFileError) as whole:
        validate_request_file(source, small, endpoint.path)
    assert expected in whole.value.problems


@pytest.mark.parametrize(("spec", "endpoint"), ENDPOINTS, ids=IDS)
def test_a_line_filling_a_file_exactly_is_a_part_of_its_own(
    tmp_path: Path, spec: VendorSpec, endpoint: EndpointSpec
) -> None:
    source = tmp_path / "requests.jsonl"
    first, full = _line(endpoint, "small"), _line(endpoint, "full", FILE - 1)
    source.write_bytes(first + b"\n" + full)  # no final newline: the part adds it

    split = split_checked(source, _small_files(spec, endpoint), endpoint.path, folder=tmp_path / "parts")

    assert [(p.lines, p.bytes) for p in split.parts] == [(1, len(first) + 1), (1, FILE)]


def test_a_line_over_a_splits_max_bytes_is_refused_by_its_line(tmp_path: Path) -> None:
    spec = REGISTRY["zhipu"]
    endpoint = spec.endpoints[0]
    source = tmp_path / "requests.jsonl"
    source.write_bytes(_line(endpoint, "a") + b"\n" + _line(endpoint, "big", 400) + b"\n")

    with pytest.raises(InvalidRequestFileError) as info:
        split_checked(source, spec, folder=tmp_path / "parts", max_bytes=300)

    assert info.value.problems == [
        "line 2: line: expected at most 299 bytes per line (with its newline a line must fit in one file: "
        "max_bytes=300), got 400 bytes"
    ]


def test_the_vendors_line_limit_still_binds_below_the_file_limit() -> None:
    spec = REGISTRY["dashscope"]
    checker = RequestChecker(spec, spec.endpoint("/v1/chat/completions") or spec.endpoints[0], None)
    assert checker.max_line_bytes == 6 * 1024**2
