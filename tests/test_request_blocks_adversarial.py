"""
Adversarial cases for the block path of ``split_checked``: it must decide nothing the line path would not.

Same technique as ``tests/test_request_blocks.py``: a file of good lines with odd ones in the middle, split
with the block path on and off (small chunks), at several places so that one of them falls inside a block.

The first section holds cases where the two paths differ (failing until fixed), the second the documented
estimate rule where both paths break it (failing until fixed), the last cases that agree and were not
covered before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec
from tests.test_request_blocks import LINES, _dumps, _file, _line, _same

VENDORS = sorted(REGISTRY)
PLACES = range(LINES // 2, LINES // 2 + 5)


def _same_at_places(
    spec: VendorSpec, odd: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    outcome = None
    for at in PLACES:
        path = _file(tmp_path / str(at), spec, odd, at=at)
        outcome, _ = _same(path, spec, tmp_path / str(at), monkeypatch)
    return outcome


# -- the paths differ ------------------------------------------------------------------------------


def _split_rows(spec: VendorSpec) -> dict[str, list[bytes]]:
    one, two, three = (_dumps(_line(spec, n)) for n in (9001, 9002, 9003))
    cut = one.index(b'"body": ') + len(b'"body": ')
    return {
        # One request over two rows, the second row closing it and holding another request: as many
        # documents as rows, each row starting with "{" or "}".
        "a request closed on the next row, which holds another": [one[:-1], b"}" + two],
        "the same with a space": [one[:-1], b"} " + two],
        # The body on a row of its own, balanced by two requests on one row.
        "a body on its own row and two requests on one row": [one[:cut], one[cut:], two + three],
    }


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("case", sorted(_split_rows(REGISTRY["openai"])))
def test_a_request_spread_over_rows_is_refused_as_the_line_path_refuses_it(
    vendor: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # msgspec's decode_lines reads whitespace-separated documents, not one per row: a block whose
    # document count equals its row count can still hold a request over two rows.
    spec = REGISTRY[vendor]
    outcome = _same_at_places(spec, _split_rows(spec)[case], tmp_path, monkeypatch)
    assert outcome[0] == "refused"


@pytest.mark.parametrize("key", ["input", "prompt"])
def test_a_vendor_that_rejects_a_counted_text_key_splits_a_good_file(
    key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watched key's field is UnsetType with default UNSET; the estimate takes UNSET for a raw text.
    spec = dataclasses.replace(REGISTRY["openai"], forbidden_body_keys=frozenset({key}))
    outcome, _ = _same(_file(tmp_path, spec, []), spec, tmp_path, monkeypatch)
    assert outcome[0] == "split"


# -- both paths break the estimate rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "as_rule_reads_it"),
    [
        (b'"max_tokens": 1e400', b'"max_tokens": null'),  # not a count: an unbounded request
        (b'"max_tokens": 9, "input": 1e400', b'"max_tokens": 9, "input": null'),  # not a text: 0 tokens
        (b'"max_tokens": 9, "input": [1e400, "abcd"]', b'"max_tokens": 9, "input": [null, "abcd"]'),
    ],
    ids=["max_tokens", "input", "input list"],
)
def test_a_kept_request_is_in_the_estimate(
    written: bytes, as_rule_reads_it: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check keeps the line (it skips the number); the estimate drops the whole request.
    spec = REGISTRY["zhipu"]
    good = _dumps(_line(spec, 9001))
    odd = _same_at_places(spec, [good.replace(b'"max_tokens": 9', written)], tmp_path / "odd", monkeypatch)
    plain = _same_at_places(
        spec, [good.replace(b'"max_tokens": 9', as_rule_reads_it)], tmp_path / "plain", monkeypatch
    )
    assert odd[0] == plain[0] == "split"
    assert odd[1].lines == odd[4].requests
    assert odd[4] == plain[4]


# -- the paths agree -------------------------------------------------------------------------------


def _agreeing(spec: VendorSpec) -> dict[str, list[bytes]]:
    good = _dumps(_line(spec, 9001))

    def edit(old: bytes, new: bytes) -> list[bytes]:
        assert old in good
        return [good.replace(old, new, 1)]

    tokens = b'"max_tokens": 9'
    return {
        "two models, the other first": edit(b'"model": "m-1"', b'"model": "m-2", "model": "m-1"'),
        "two models, the other last": edit(b'"model": "m-1"', b'"model": "m-1", "model": "m-2"'),
        "two ids, empty first": edit(b'"custom_id"', b'"custom_id": "", "custom_id"'),
        "two ids, empty last": edit(b'"method"', b'"custom_id": "", "method"'),
        "two ids, a repeated one last": edit(b'"method"', b'"custom_id": "r-3", "method"'),
        "two bodies": [good[:-1] + b', "body": {"model": "m-1", "input": "abcdefgh"}}'],
        "two messages": edit(tokens, tokens + b', "messages": "hi"'),
        "escaped keys": [
            good.replace(b'"custom_id"', b'"custom\\u005fid"')
            .replace(b'"method"', b'"met\\u0068od"')
            .replace(b'"url"', b'"\\u0075rl"')
            .replace(b'"model"', b'"\\u006dodel"')
            .replace(b'"content"', b'"c\\u006fntent"')
        ],
        "escaped values": [good.replace(b'"POST"', b'"\\u0050OST"').replace(b'"m-1"', b'"m\\u002d1"')],
        "POST and a space": edit(b'"POST"', b'"POST "'),
        "post": edit(b'"POST"', b'"post"'),
        "a number for the model": edit(b'"m-1"', b"1"),
        "a list for the model": edit(b'"m-1"', b'["m-1"]'),
        "NaN where nothing reads": edit(tokens, tokens + b', "metadata": NaN'),
        "a number too long to read where nothing reads": edit(
            tokens, tokens + b', "metadata": ' + b"9" * 5000
        ),
        "a number too long to read for max_tokens": edit(tokens, b'"max_tokens": ' + b"9" * 5000),
        "a 30-digit max_tokens": edit(tokens, b'"max_tokens": ' + b"9" * 30),
        "deeper than the parser goes": edit(tokens, tokens + b', "metadata": ' + b"[" * 1100 + b"]" * 1100),
        "a raw control character": edit(b"Review", b"Re\x01view"),
        "a raw DEL": edit(b"Review", b"Re\x7fview"),
        "an overlong encoding": edit(b"Review", b"Re\xc0\xafview"),
        "a surrogate in UTF-8": edit(tokens, tokens + b', "user": "\xed\xa0\x80"'),
        "a lone surrogate id": edit(b'"r-9001"', b'"r\\ud800"'),
        "a lone surrogate where nothing reads": edit(tokens, tokens + b', "user": "\\udc00x"'),
        "a surrogate pair": edit(b'"content": "', b'"content": "\\ud83d\\udc4d", "c": "'),
        "ids equal but for normalization": [
            _dumps({**_line(spec, 1), "custom_id": "caf\u00e9"}),
            _dumps({**_line(spec, 2), "custom_id": "cafe\u0301"}),
        ],
        "an id repeated with an escape": [good, good.replace(b'"r-9001"', b'"r\\u002d9001"')],
        "an earlier id repeated with an escape": edit(b'"r-9001"', b'"r\\u002d3"'),
        "a null response_format": edit(tokens, tokens + b', "response_format": null'),
        "a null forbidden key": edit(tokens, tokens + b', "temperature": null'),
        "content of other kinds": [
            _dumps(_line(spec, 9101, content=["abcd", None, {"text": "配送"}, {"text": 5}, 7])),
            _dumps(_line(spec, 9102, content=5)),
            _dumps({**_line(spec, 9103), "body": {"model": "m-1", "messages": [], "max_tokens": 1}}),
            _dumps({**_line(spec, 9104), "body": {"model": "m-1", "messages": [None, {}]}}),
        ],
        "spaces around a text": edit(b'"content": "', b'"content"  :   "'),
    }


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("case", sorted(_agreeing(REGISTRY["openai"])))
def test_an_odd_line_gets_the_line_paths_outcome(
    vendor: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = REGISTRY[vendor]
    _same_at_places(spec, _agreeing(spec)[case], tmp_path, monkeypatch)


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_response_format_is_estimated_alike_where_no_rule_reads_it(
    vendor: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = dataclasses.replace(REGISTRY[vendor], structured_output=None)
    formats = [{"type": "json_object"}, {"type": "text", "x": [1.5, "é", 1e2]}, "json", {}]
    odd = [_dumps(_line(spec, 9100 + n, response_format=f)) for n, f in enumerate(formats)]
    assert _same_at_places(spec, odd, tmp_path, monkeypatch)[0] == "split"


@pytest.mark.parametrize("delta", [-1, 0])
def test_a_line_at_the_line_limit(delta: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["dashscope"]
    odd = _dumps(_line(spec, 9001))
    small = dataclasses.replace(
        spec, limits=dataclasses.replace(spec.limits, max_line_bytes=len(odd) + delta)
    )
    outcome = _same_at_places(small, [odd], tmp_path, monkeypatch)
    assert outcome[0] == ("refused" if delta < 0 else "split")


@pytest.mark.parametrize("number", [b"1e400", b"9" * 5000])
def test_a_repeated_id_is_named_on_a_line_with_a_number_too_large_to_build(
    number: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check skips the unread number and keys the id; naming the repeated ids must read it too.
    spec = REGISTRY["zhipu"]
    again = _dumps(_line(spec, 3)).replace(b'"max_tokens": 9', b'"max_tokens": 9, "metadata": ' + number)
    outcome = _same_at_places(spec, [again], tmp_path, monkeypatch)
    assert outcome[0] == "refused"
    assert "an id used once in the whole input (it is on line 4 already)" in outcome[1]
