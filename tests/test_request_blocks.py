"""
The block path of a whole-input check decides nothing the line path does not.

Each case is a file of good lines with one odd line (or a few) in the middle, checked and split twice
with small chunks: once as it runs, once with the block path switched off (every line through
``RequestChecker.line``). Both must give the same outcome to the byte: the same problems, or the same
report, the same parts and the same token estimate. And the block path must have been used, for the good
blocks around the odd line.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch import jsonl_check
from airflow_provider_llmbatch.exceptions import InvalidRequestFileError
from airflow_provider_llmbatch.parts import Part, split_checked
from airflow_provider_llmbatch.request_blocks import BlockPath
from airflow_provider_llmbatch.token_estimate import TokenEstimator
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

CHUNK = 2048
LINES = 120


def _line(spec: VendorSpec, n: int, **body: Any) -> dict[str, Any]:
    content = body.pop("content", f"Review {n}: 配送很快, the box was dented.")
    return {
        "custom_id": f"r-{n}",
        "method": "POST",
        "url": spec.default_endpoint,
        "body": {"model": "m-1", "messages": [{"role": "user", "content": content}], "max_tokens": 9, **body},
    }


def _dumps(line: Any) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode()


def _file(tmp_path: Path, spec: VendorSpec, odd: list[bytes], at: int = LINES // 2) -> Path:
    lines = [_dumps(_line(spec, n)) for n in range(LINES)]
    lines[at:at] = odd
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _read(part: Part) -> bytes:
    with part.open() as reader:
        return reader.read()


def _outcome(path: Path, spec: VendorSpec, folder: Path) -> tuple[Any, ...]:
    estimator = TokenEstimator()
    try:
        split = split_checked(path, spec, folder=folder, estimator=estimator, max_requests=50)
    except InvalidRequestFileError as exc:
        return ("refused", str(exc))
    parts = tuple(_read(part) for part in split.parts)
    shape = tuple((p.index, p.lines, p.bytes) for p in split.parts)
    return ("split", split.report, shape, parts, estimator.estimate())


def _both(
    path: Path, spec: VendorSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Any, int]:
    """Return the outcome with the block path, without it, and how many lines the block path took."""
    monkeypatch.setattr(jsonl_check, "_CHUNK", CHUNK)
    taken = 0
    real_take = BlockPath.take

    def counting(self: BlockPath, block: bytes) -> int:
        nonlocal taken
        count = real_take(self, block)
        taken += count
        return count

    with monkeypatch.context() as patch:
        patch.setattr(BlockPath, "take", counting)
        fast = _outcome(path, spec, tmp_path / "fast")
    with monkeypatch.context() as patch:
        patch.setattr(BlockPath, "take", lambda self, block: 0)
        slow = _outcome(path, spec, tmp_path / "slow")
    return fast, slow, taken


def _same(path: Path, spec: VendorSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, int]:
    fast, slow, taken = _both(path, spec, tmp_path, monkeypatch)
    assert fast == slow
    return fast, taken


def test_a_good_file_goes_through_the_block_path_with_the_line_paths_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY["zhipu"]
    outcome, taken = _same(_file(tmp_path, spec, []), spec, tmp_path, monkeypatch)
    assert outcome[0] == "split"
    assert outcome[1].lines == LINES
    assert [len(p.splitlines()) for p in outcome[3]] == [50, 50, 20]
    # All but the first chunk's lines (read before the model is known) and the lines around it.
    assert taken > LINES // 2


def _odd_lines(spec: VendorSpec) -> dict[str, list[bytes]]:
    good = _line(spec, 9000)
    body = good["body"]
    return {
        "a blank line": [b""],
        "a line of spaces": [b"   \t"],
        "two requests on one line": [_dumps(_line(spec, 9001)) + b" " + _dumps(_line(spec, 9002))],
        "a blank line and two requests on one line": [
            b"  ",
            _dumps(_line(spec, 9001)) + b" " + _dumps(_line(spec, 9002)),
        ],
        "leading spaces": [b"  " + _dumps(good)],
        "trailing spaces": [_dumps(good) + b"  "],
        "a CRLF line": [_dumps(good) + b"\r"],
        "a forbidden or watched key": [_dumps(_line(spec, 9001, temperature=0.5))],
        "a forbidden key spelled with an escape": [
            _dumps(_line(spec, 9001, temperature=0.5)).replace(b'"temperature"', b'"temp\\u0065rature"')
        ],
        "a response_format": [_dumps(_line(spec, 9001, response_format={"type": "json_object"}))],
        "an empty response_format": [_dumps(_line(spec, 9001, response_format={}))],
        "an unknown line key": [_dumps({**good, "extra": 1})],
        "no body": [_dumps({k: v for k, v in good.items() if k != "body"})],
        "a null body": [_dumps({**good, "body": None})],
        "another model": [_dumps({**good, "body": {**body, "model": "m-2"}})],
        "a body without a model": [_dumps({**good, "body": {k: v for k, v in body.items() if k != "model"}})],
        "GET": [_dumps({**good, "method": "GET"})],
        "another url": [_dumps({**good, "url": "/v1/embeddings"})],
        "an empty custom_id": [_dumps({**good, "custom_id": ""})],
        "a number for custom_id": [_dumps({**good, "custom_id": 7})],
        "a repeated custom_id": [_dumps(_line(spec, 3))],
        "a non-ASCII custom_id": [_dumps({**good, "custom_id": "评论-1"})],
        "invalid UTF-8 in a text": [_dumps(good).replace("配送".encode(), b"\xff\xfe")],
        "invalid UTF-8 in a field nothing reads": [
            _dumps({**good, "body": {**body, "user": "x"}}).replace(b'"x"', b'"\xc3"')
        ],
        "a lone surrogate escape": [_dumps(_line(spec, 9001, content="a-b")).replace(b"a-b", b"a\\ud800b")],
        "escapes in a text": [json.dumps(_line(spec, 9001, content='say "hi"\n\t配送')).encode()],
        "a text as a list of parts": [
            _dumps(_line(spec, 9001, content=[{"type": "text", "text": "配送 fast"}, {"type": "image_url"}]))
        ],
        "a null text": [_dumps(_line(spec, 9001, content=None))],
        "messages as a string": [_dumps({**good, "body": {**body, "messages": "hello"}})],
        "a message that is not an object": [
            _dumps({**good, "body": {**body, "messages": ["hello", {"content": "x"}]}})
        ],
        "no messages": [_dumps({**good, "body": {"model": "m-1", "input": ["a", "b 配送"], "prompt": "p"}})],
        "odd output bounds": [
            _dumps({**good, "body": {**body, "max_tokens": True, "max_completion_tokens": 5}}),
            _dumps({**good, "custom_id": "b2", "body": {**body, "max_tokens": -1}}),
            _dumps({**good, "custom_id": "b3", "body": {**body, "max_tokens": 2.5, "max_output_tokens": 4}}),
        ],
        "NaN": [_dumps(good).replace(b'"max_tokens": 9', b'"max_tokens": NaN')],
        "deep nesting": [_dumps({**good, "body": {**body, "metadata": json.loads("[" * 600 + "]" * 600)}})],
        "a BOM inside the file": [b"\xef\xbb\xbf" + _dumps(good)],
        "a line that is not JSON": [b"{not json"],
        "an array": [b"[1, 2]"],
        "a line starting with a byte after the brace": [b"}" + _dumps(good)],
    }


ODD_CASES = sorted(_odd_lines(REGISTRY["openai"]))


@pytest.mark.parametrize("vendor", sorted(REGISTRY))
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_line_gets_the_line_paths_outcome(
    vendor: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY[vendor]
    # At several places: a line across two chunks goes the line path, so one of them is inside a block.
    for at in range(LINES // 2, LINES // 2 + 5):
        path = _file(tmp_path / str(at), spec, _odd_lines(spec)[case], at=at)
        _same(path, spec, tmp_path / str(at), monkeypatch)


def test_an_over_long_line_gets_the_line_paths_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY["dashscope"]
    small = dataclasses.replace(spec, limits=dataclasses.replace(spec.limits, max_line_bytes=400))
    path = _file(tmp_path, small, [_dumps(_line(small, 9001, content="x" * 500))])
    outcome, _ = _same(path, small, tmp_path, monkeypatch)
    assert outcome[0] == "refused"
    assert "at most 400 bytes" in outcome[1]


def test_a_problem_on_the_first_line_keeps_every_line_on_the_line_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY["moonshot"]
    path = _file(tmp_path, spec, [b"{}"], at=0)
    outcome, taken = _same(path, spec, tmp_path, monkeypatch)
    assert outcome[0] == "refused"
    assert taken == 0


MUTATIONS: list[Callable[[bytes], bytes]] = [
    lambda line: line,
    lambda line: line + b" ",
    lambda line: b" " + line,
    lambda line: line + b"\r",
    lambda line: b"",
    lambda line: line.replace(b'"POST"', b'"PUT"'),
    lambda line: line.replace(b'"m-1"', b'"m-2"'),
    lambda line: line.replace(b'"max_tokens": 9', b'"max_tokens": 9, "top_p": 1'),
    lambda line: line.replace(b'"content": "', b'"content": "\\"'),
    lambda line: line.replace("配送".encode(), b"\\u914d\\u9001"),
    lambda line: line[: len(line) // 2],
    lambda line: line + line,
    lambda line: line + b" " + line,
    lambda line: line[: len(line) // 2] + b"\n" + line[len(line) // 2 :],
    lambda line: line[:-1],
    lambda line: b"}" + line,
    lambda line: line.replace(b'"body": ', b'"body": \n'),
]


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    vendor=st.sampled_from(sorted(REGISTRY)),
    # Odd lines close together, so that several of them meet in one block.
    edits=st.lists(
        st.tuples(st.integers(LINES // 3, LINES // 3 + 15), st.integers(0, len(MUTATIONS) - 1)),
        max_size=5,
        unique_by=lambda e: e[0],
    ),
)
def test_any_mix_of_odd_lines_gets_the_line_paths_outcome(
    vendor: str, edits: list[tuple[int, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY[vendor]
    lines = [_dumps(_line(spec, n)) for n in range(LINES)]
    for at, mutation in edits:
        lines[at] = MUTATIONS[mutation](lines[at])
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    for folder in ("fast", "slow"):
        for part in (tmp_path / folder).glob("*"):
            part.unlink()
    _same(path, spec, tmp_path, monkeypatch)


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("odd", [[], [b"{not json"]])
def test_the_garbage_collector_is_as_it_was_after_a_block(
    enabled: bool, odd: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The block path pauses the collector while a block's objects live, and leaves it as it found it.
    spec = REGISTRY["zhipu"]
    monkeypatch.setattr(jsonl_check, "_CHUNK", CHUNK)
    path = _file(tmp_path, spec, odd)
    seen: list[bool] = []
    real_take = BlockPath._take

    def watching(self: BlockPath, block: bytes) -> int:
        seen.append(gc.isenabled())
        return real_take(self, block)

    monkeypatch.setattr(BlockPath, "_take", watching)
    (gc.enable if enabled else gc.disable)()
    try:
        _outcome(path, spec, tmp_path / "parts")
        assert gc.isenabled() is enabled
    finally:
        gc.enable()
    assert seen
    assert not any(seen)
