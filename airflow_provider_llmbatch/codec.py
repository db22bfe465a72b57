"""
Strict JSON for the lines of batch files, read and written by msgspec where it gives what json gives.

Request lines, as they are checked and built, are UTF-8 JSON without NaN or Infinity: :data:`loads`
and :data:`dumps`, failing with one of :data:`CODEC_ERRORS`. :func:`shape_decoder` reads only what the
checks look at, and :func:`json_loads` says in words why a line does not parse.

The results join reads vendor lines (:func:`parse_vendor_line`) and request lines (:func:`read_request`)
as ``json.loads`` reads them, and writes rows as ``json.dumps`` writes them (:func:`to_json`): msgspec
does the work where it gives the same result, and :mod:`json` takes every line msgspec refuses or that
is nested too deeply for it, so a line reads the same either way.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

UNSET: Any = msgspec.UNSET
"""What a struct decoder leaves in a field the line does not have."""

loads: Callable[[bytes], Any] = msgspec.json.Decoder().decode
"""Parse a request line: UTF-8 only, no NaN or Infinity (msgspec is that strict by itself)."""

dumps: Callable[[Any], bytes] = msgspec.json.Encoder().encode
"""Serialize compactly, non-ASCII as UTF-8."""

# Both parsers stop nesting deeper than about 1,000 levels with RecursionError: a bad line, not a crash.
CODEC_ERRORS: tuple[type[Exception], ...] = (
    msgspec.MsgspecError,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
)
"""What the parsers and serializers here raise for a line or value they refuse."""


def is_utf8(raw: bytes) -> bool:
    """Return whether ``raw`` is valid UTF-8."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _ParsedFloat(float):
    """
    A float read from a line.

    msgspec's encoder refuses it, so any value holding a float is written by :mod:`json`, whose float
    text (``1e+16``) the rows have always had; msgspec would write ``1e16``.
    """

    __slots__ = ()


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _finite(text: str) -> float:
    value = _ParsedFloat(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def json_loads(raw: bytes) -> Any:
    """Parse one JSON document strictly with the standard library: UTF-8 only, no NaN or Infinity."""
    return json.loads(raw.decode("utf-8"), parse_constant=_not_json, parse_float=_finite)


@functools.cache
def shape_decoder(forbidden: frozenset[str]) -> tuple[Callable[[bytes], Any], tuple[str, ...]]:
    """
    Return a decoder of request lines that builds only what the checks read, and the forbidden keys' fields.

    The rest of a line (the prompts) is parsed and checked for syntax but never built into Python
    objects, which is most of the cost of parsing. It refuses a line with keys other than a request
    line's; a field it leaves :data:`UNSET` is missing from the line.

    :param forbidden: the body keys to report; their fields are named ``forbidden_<n>``.
    """
    names = tuple(f"forbidden_{i}" for i in range(len(forbidden)))
    body = msgspec.defstruct(
        "RequestBodyShape",
        [("model", Any, UNSET), *((name, Any, UNSET) for name in names)],
        rename=dict(zip(names, sorted(forbidden), strict=True)),
    )
    line = msgspec.defstruct(
        "RequestLineShape",
        [("custom_id", Any, UNSET), ("method", Any, UNSET), ("url", Any, UNSET), ("body", body, UNSET)],
        forbid_unknown_fields=True,
    )
    return msgspec.json.Decoder(line).decode, names


# Built once (``json.loads`` with hooks builds a new decoder for every call). Vendor lines are read
# strictly; request lines as ``json.loads`` reads them (NaN and Infinity pass).
_STRICT = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
_LENIENT = json.JSONDecoder(parse_constant=_ParsedFloat, parse_float=_ParsedFloat)
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode
_decode_finite = msgspec.json.Decoder(float_hook=_finite).decode
_decode_request_id: Callable[[bytes], Any] = msgspec.json.Decoder(
    msgspec.defstruct("RequestId", [("custom_id", Any, UNSET)])
).decode
# Lines with fewer brackets than this are nested too shallowly for either parser's recursion limit, so
# msgspec and json agree on them; deeper ones are left to json, whose limit the rules were written for.
_FAST_NESTING = 512


def _shallow(raw: bytes) -> bool:
    # Nesting N levels deep takes 2N bytes of brackets in a line either parser accepts.
    return len(raw) < 2 * _FAST_NESTING or raw.count(b"[") + raw.count(b"{") < _FAST_NESTING


def _parse(raw: bytes, decoder: json.JSONDecoder) -> Any:
    """Parse one line exactly as ``json.loads(raw)`` does, with the decoder's hooks."""
    return decoder.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def _utf8(text: str) -> bytes:
    """Encode JSON text; a lone surrogate (legal in a JSON string escape) is written back as its escape."""
    return text.encode("utf-8", "backslashreplace")


def parse_vendor_line(raw: bytes) -> Any:
    """
    Parse a vendor line strictly: NaN, Infinity and overflowing numbers cannot be written back as JSON.

    msgspec reads the line when it can; it refuses everything :mod:`json` refuses here (and a few lines
    json takes: a BOM, UTF-16, lone surrogates), and each line it refuses is read again by json, so a
    line reads the same either way. Floats come back as a float subclass that :func:`to_json` writes
    with json.
    """
    if _shallow(raw):
        try:
            return _decode_finite(raw)
        except CODEC_ERRORS:
            pass
    return _parse(raw, _STRICT)


def parse_vendor_object(raw: bytes) -> dict[str, Any]:
    """
    Parse a vendor result line that must be a JSON object, as :func:`parse_vendor_line` reads it.

    :raises ValueError: the line is not JSON, or not an object.
    """
    data = parse_vendor_line(raw)
    if type(data) is not dict:
        raise ValueError("not a JSON object")
    return data


def to_json(value: Any) -> bytes:
    """
    Serialize compactly, non-ASCII as UTF-8: ``json.dumps(value, ensure_ascii=False, separators=...)``.

    msgspec writes the same bytes for everything but floats, which it refuses as parsed by
    :func:`parse_vendor_line` (as it refuses lone surrogates); those values are written by json.
    """
    try:
        return dumps(value)
    except (TypeError, ValueError):
        return _utf8(_ENCODE(value))


def request_id(raw: bytes) -> Any:
    """
    Return a request line's ``custom_id`` value (UNSET when missing), building nothing else.

    The rest of the line is checked for syntax but skipped, as the line checks skip it, so a line they
    read gives its id here too (a number too large to build elsewhere in the line does not matter).

    :raises msgspec.DecodeError: the line is not JSON (one of :data:`CODEC_ERRORS`).
    """
    return _decode_request_id(raw).custom_id


def _fast_request(raw: bytes, with_body: bool) -> tuple[str, dict[str, Any] | None] | None:
    """
    Read a request line's id (and body) with msgspec; None when json must decide.

    Without the body, only the id is built: the rest is checked for syntax but skipped, and a skipped
    part is not checked for what json would refuse in it, invalid UTF-8 and integers too long to read
    (``sys.get_int_max_str_digits``), so such lines are read in full instead.
    """
    limit = sys.get_int_max_str_digits()
    try:
        if not with_body and (not limit or len(raw) <= limit) and (raw.isascii() or is_utf8(raw)):
            custom_id, body = _decode_request_id(raw).custom_id, None
        else:
            data = _decode_finite(raw)
            if type(data) is not dict:
                return None
            custom_id, body = data.get("custom_id"), data.get("body")
    except CODEC_ERRORS:
        return None
    if custom_id is None or custom_id is UNSET or custom_id == "":
        return None
    return str(custom_id), body if type(body) is dict else None


def read_request(raw: bytes, with_body: bool) -> tuple[str, dict[str, Any] | None] | None:
    """
    Return a request line's custom_id and body (a dict, or None) as ``json.loads`` reads the line.

    :param raw: the line.
    :param with_body: read the body too; without, None stands for every body.
    :return: None when the line is not a JSON object with a custom_id (missing, null or empty).
    """
    if _shallow(raw):
        request = _fast_request(raw, with_body)
        if request is not None:
            return request
    try:
        data = _parse(raw, _LENIENT)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("custom_id") in (None, ""):
        return None
    body = data.get("body") if with_body else None
    return str(data["custom_id"]), body if isinstance(body, dict) else None


def inexact(value: Any, where: str) -> tuple[str, str] | None:
    """
    Return where (a dotted path from ``where``) and what the first value is that JSON cannot carry as it is.

    JSON carries text, whole and finite numbers, booleans, null, lists (and tuples) and objects with text
    keys. Anything else would reach the model changed: bytes as base64, a ``Decimal`` or a ``datetime`` as
    text, a set as a list, NaN as null, a number key as text. None when every value is exact.
    """
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if item is None or isinstance(item, str | int):  # bool is an int
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return path, f"{item!r}, which is not a JSON number"
            continue
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    return path, f"the key {key!r} ({type(key).__name__}); JSON keys are text"
                stack.append((child, f"{path}.{key}"))
            continue
        if isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
            continue
        return path, f"a value of type {type(item).__name__}, which JSON cannot carry; convert it first"
    return None
