"""
An estimate of the tokens a request file will use, made in the pass that checks and splits it.

:func:`~airflow_provider_llmbatch.parts.split_checked` adds each line it keeps (:meth:`TokenEstimator.line`),
or a block of lines at once (:meth:`TokenEstimator.bodies`), so the estimate costs no second read of the
file, and :mod:`~airflow_provider_llmbatch.budget` judges it before anything is uploaded.

**How input tokens are estimated.** Over the texts a request sends the model: each message's ``content``
(a string, or the ``text`` of its parts), ``input`` and ``prompt`` (embeddings and completions), and the
JSON text of a ``response_format`` (a JSON Schema is sent too). In each text, a CJK character (Chinese,
Japanese kana, Korean, full-width forms: three UTF-8 bytes) counts as one token, an ASCII character as a
quarter of one, a two-byte letter (Cyrillic, Greek, accented Latin) as five eighths, rounded up per text
(:func:`text_tokens`: ``ceil((3 * bytes - characters) / 8)``, computed from the text's UTF-8 length);
each message adds :data:`MESSAGE_OVERHEAD` tokens and each request
:data:`REQUEST_OVERHEAD` (the chat template's role markers). It is a rule of thumb, not a tokenizer: no
vendor's tokenizer is bundled, and English prose usually comes out a little high (which errs on the side
of the budget).

**Output.** A request that sets ``max_tokens`` (or ``max_completion_tokens`` / ``max_output_tokens``)
bounds its output; the estimate adds those bounds up. Requests without one have no bound, and the cost
estimate leaves their output out (the log and the error say how many there were).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import repeat
from operator import add, floordiv, mul, sub
from typing import Any

import msgspec

from airflow_provider_llmbatch.codec import read_request

MESSAGE_OVERHEAD = 3
"""Tokens added per chat message (role markers)."""

REQUEST_OVERHEAD = 3
"""Tokens added per request (the start of the reply)."""

CHARS_PER_TOKEN = 4
"""Characters per token outside CJK text."""

_OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


_RAW = msgspec.Raw
_NULL = msgspec.Raw(b"null")


# gc=False: decoded JSON holds no cycles, and untracked structs keep a block's decode out of the
# garbage collector's way (tracked, a block of lines triggered collection after collection).
class _Message(msgspec.Struct, gc=False):
    content: msgspec.Raw = _NULL


class _Body(msgspec.Struct, gc=False):
    """What the estimate reads of a request body; the texts stay raw JSON until they are counted."""

    messages: list[_Message] | None = None
    input: msgspec.Raw = _NULL
    prompt: msgspec.Raw = _NULL
    response_format: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


BODY_FIELDS: tuple[tuple[str, Any, Any], ...] = tuple(
    (f.name, f.type, f.default) for f in msgspec.structs.fields(_Body)
)
"""What :meth:`TokenEstimator.bodies` reads of a body: each field's name, type and default."""


class _Line(msgspec.Struct, gc=False):
    body: _Body | None = None


class _LooseBody(msgspec.Struct, gc=False):
    messages: Any = None
    input: Any = None
    prompt: Any = None
    response_format: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    max_output_tokens: Any = None


class _LooseLine(msgspec.Struct, gc=False):
    body: _LooseBody | None = None


_decode_line = msgspec.json.Decoder(_Line).decode
# For a body whose messages are not a list of objects (read as they are, counted by the same rule).
_decode_loose_line = msgspec.json.Decoder(_LooseLine).decode
_decode_value = msgspec.json.Decoder().decode
_LOOSE_FIELDS = msgspec.structs.fields(_LooseBody)
_ESTIMATE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


def text_tokens(text: str) -> int:
    """
    Return the estimated tokens of one text: ``ceil((3 * B - N) / 8)`` for N characters in B UTF-8 bytes.

    That is a quarter of a token per ASCII character and one per CJK character (Chinese, kana, Hangul:
    three bytes each), a little over half a token per two-byte letter (Cyrillic, Greek, accented Latin);
    measured in C (the text's UTF-8 length), not character by character.
    """
    if not text:
        return 0
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return -(-(3 * size - len(text)) // 8)


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += text_tokens(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                total += text_tokens(part["text"])
        return total
    return 0


def _texts_tokens(texts: list[msgspec.Raw]) -> int:
    """
    Return the sum of :func:`_content_tokens` over raw JSON values, in C loops for the plain strings.

    For a string of B bytes and N characters written as JSON without escapes (b = B + 2 bytes and
    n = N + 2 characters with its quotes), ``ceil((3B - N) / 8)`` is ``(3b - n + 3) // 8``. That sum is
    taken over all of them; then each value that is no plain string (escapes, a list, null) has its
    share replaced by the tokens of the value decoded.

    :raises ValueError: a value is not UTF-8, or does not decode (a lone surrogate escape).
    """
    strings = list(map(str, texts, repeat("utf-8")))
    total: int = sum(
        map(
            floordiv,
            map(add, map(sub, map(mul, map(len, texts), repeat(3)), map(len, strings)), repeat(3)),
            repeat(8),
        )
    )
    if sum(map(str.startswith, strings, repeat('"'))) == len(strings) and "\\" not in "".join(strings):
        return total
    for raw, text in zip(texts, strings, strict=True):
        if text[0] != '"' or "\\" in text:
            total += _content_tokens(_decode_value(raw)) - (3 * len(raw) - len(text) + 3) // 8
    return total


def _format_tokens(response_format: Any) -> int:
    if not isinstance(response_format, dict):
        return 0
    return text_tokens(json.dumps(response_format, ensure_ascii=False, separators=(",", ":")))


def _bound(body: Any) -> int | None:
    """Return a body's output bound: the first of its output limits that is a count, else None."""
    for name in _OUTPUT_LIMITS:
        value = getattr(body, name)
        if is_count(value):
            return int(value)
    return None


def _tally(bodies: list[Any]) -> tuple[int, int, int]:
    """
    Return the input tokens, the sum of the output bounds and the unbounded requests of bodies read
    with :data:`BODY_FIELDS`, over all of them at once (a block of lines is thousands of bodies).

    :raises ValueError: a text does not decode.
    """
    texts = [message.content for body in bodies if body.messages for message in body.messages]
    tokens = REQUEST_OVERHEAD * len(bodies) + MESSAGE_OVERHEAD * len(texts) + _texts_tokens(texts)
    # Raw texts only: a key the vendor forbids is read as UNSET (the line would not have passed with it).
    others = [
        v for body in bodies for v in (body.input, body.prompt) if type(v) is msgspec.Raw and v is not _NULL
    ]
    tokens += _texts_tokens(others)
    tokens += sum(
        _format_tokens(body.response_format) for body in bodies if isinstance(body.response_format, dict)
    )
    bounds = [
        body.max_tokens if type(body.max_tokens) is int and body.max_tokens >= 0 else _bound(body)
        for body in bodies
    ]
    bounded = [bound for bound in bounds if bound is not None]
    return tokens, sum(bounded), len(bounds) - len(bounded)


def _loose_tally(body: _LooseBody) -> tuple[int, int, int]:
    """:func:`_tally` of one body whose messages are not a list of objects, read as they are."""
    tokens = REQUEST_OVERHEAD + _content_tokens(body.input) + _content_tokens(body.prompt)
    if isinstance(body.messages, list):
        for message in body.messages:
            tokens += MESSAGE_OVERHEAD
            if isinstance(message, dict):
                tokens += _content_tokens(message.get("content"))
    bound = _bound(body)
    return tokens + _format_tokens(body.response_format), bound or 0, int(bound is None)


@dataclass(frozen=True)
class TokenEstimate:
    """
    What an input is estimated to use.

    :param requests: the requests estimated.
    :param input_tokens: the estimated prompt tokens of all of them.
    :param max_output_tokens: the sum of the output bounds (``max_tokens``) the requests set.
    :param unbounded_requests: requests that set no output bound.
    """

    requests: int
    input_tokens: int
    max_output_tokens: int
    unbounded_requests: int

    def to_dict(self) -> dict[str, int]:
        """Return the estimate as JSON primitives."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "unbounded_requests": self.unbounded_requests,
        }


class TokenEstimator:
    """Add up the estimated tokens of request lines, one line at a time (memory stays flat)."""

    def __init__(self) -> None:
        self.requests = 0
        self.input_tokens = 0
        self.max_output_tokens = 0
        self.unbounded_requests = 0

    def line(self, raw: bytes) -> None:
        """
        Add one request line; a line that does not parse is left to the checks (it fails them).

        A line msgspec will not read (a number out of its range, where the checks skip it) is read as
        ``json.loads`` reads it: the number is then no count and no text, as if it were null.
        """
        try:
            try:
                body: Any = _decode_line(raw).body
                counted = (0, 0, 1) if body is None else _tally([body])
            except msgspec.ValidationError:
                # Messages that are not a list of objects: read as they are.
                body = _decode_loose_line(raw).body
                counted = (0, 0, 1) if body is None else _loose_tally(body)
        except msgspec.DecodeError:
            request = read_request(raw, with_body=True)
            if request is None:
                return
            body = request[1]
            loose = None if body is None else _LooseBody(**{f.name: body.get(f.name) for f in _LOOSE_FIELDS})
            counted = (0, 0, 1) if loose is None else _loose_tally(loose)
        except _ESTIMATE_ERRORS:
            return
        self._add(1, *counted)

    def bodies(self, bodies: list[Any]) -> bool:
        """
        Add the bodies of a block of checked request lines (structs with :data:`BODY_FIELDS`), or none.

        :return: False, with nothing added, when a text does not decode; the lines then go one by one.
        """
        try:
            counted = _tally(bodies)
        except _ESTIMATE_ERRORS:
            return False
        self._add(len(bodies), *counted)
        return True

    def _add(self, requests: int, input_tokens: int, max_output_tokens: int, unbounded: int) -> None:
        self.requests += requests
        self.input_tokens += input_tokens
        self.max_output_tokens += max_output_tokens
        self.unbounded_requests += unbounded

    def estimate(self) -> TokenEstimate:
        """Return the estimate of the lines added so far."""
        return TokenEstimate(
            self.requests, self.input_tokens, self.max_output_tokens, self.unbounded_requests
        )


def is_count(value: Any) -> bool:
    """Return whether a value is a whole number of tokens (an int, not a bool, at least 0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
