"""
The fast path of a whole-input check: a block of complete request lines checked and estimated at once.

:func:`~airflow_provider_llmbatch.parts.split_checked` reads an input a chunk at a time, and most chunks of
a good file hold nothing but good lines. For those, this path does in a few calls over the whole block
what :meth:`RequestChecker.line <airflow_provider_llmbatch.jsonl_lines.RequestChecker.line>` does per line:
msgspec decodes every line at once into the fields the checks read (and the token estimate's, its texts
left raw), and the checks run over the decoded block. It decides nothing itself: at the first doubt (a
problem found already, no model seen yet, a line not starting with ``{``, a blank line, a CR, a line over
the vendor's line limit, text that is not UTF-8, a key the vendor rejects or a ``response_format`` the
vendor's rules look at, anything msgspec refuses, any field the line path would report) it hands the
block back untouched, and the block goes line by line, where the problem is found and named.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from itertools import repeat
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UnsetType

from airflow_provider_llmbatch.codec import CODEC_ERRORS, UNSET, is_utf8
from airflow_provider_llmbatch.jsonl_lines import RequestChecker
from airflow_provider_llmbatch.token_estimate import BODY_FIELDS, TokenEstimator


class BlockPath:
    """
    Check (and estimate) blocks of complete lines for one pass, or hand them back.

    :param checker: the pass's checker (``whole_input``); it counts the lines a block passes.
    :param estimator: the pass's token estimate, if one is made.
    """

    def __init__(self, checker: RequestChecker, estimator: TokenEstimator | None = None) -> None:
        self.checker = checker
        self.estimator = estimator
        spec = checker.spec
        watched = spec.forbidden_body_keys | ({"response_format"} if spec.structured_output else set())
        # A key the line path reports (or reads in full) fails the decode: only UNSET is allowed in it.
        self._body_fields: list[tuple[str, Any, Any]] = [
            (key, UnsetType, UNSET) for key in sorted(watched - {"model"})
        ]
        if estimator is not None:
            self._body_fields += [field for field in BODY_FIELDS if field[0] not in watched]
        self._decode: Callable[[bytes], list[Any]] | None = None
        self._model: str | None = None

    def _decoder(self, model: str) -> Callable[[bytes], list[Any]]:
        """
        Return the decoder of blocks whose every line is good for ``model``: any other line fails it.

        The rules of the line path's fast check are types here, checked by msgspec as it decodes: a
        non-empty string id, ``POST``, the endpoint, the model, no key the vendor rejects, no unknown
        key in the line. Its structs are not tracked by the garbage collector (decoded JSON has no
        cycles, and a block is thousands of them).
        """
        if self._decode is None or model != self._model:
            body = msgspec.defstruct(
                "RequestBlockBody", [("model", Literal[model]), *self._body_fields], gc=False
            )
            line = msgspec.defstruct(
                "RequestBlockLine",
                [
                    ("custom_id", Annotated[str, msgspec.Meta(min_length=1)]),
                    ("method", Literal["POST"]),
                    ("url", Literal[self.checker.url]),
                    ("body", body),
                ],
                forbid_unknown_fields=True,
                gc=False,
            )
            self._decode, self._model = msgspec.json.Decoder(line).decode_lines, model
        return self._decode

    def take(self, block: bytes) -> int:
        """
        Check a block of whole lines (each ending in a newline) as the line path would, counting them.

        :return: how many lines the block held, all of them good; 0 when it is handed back unchanged.
        """
        # The block's thousands of lists and strings, made and dropped here, hold no reference cycles;
        # with the collector paused they set off no collection that walks the whole heap (a task's
        # heap is Airflow's: about a fifth of this path's time for short lines).
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._take(block)
        finally:
            if enabled:
                gc.enable()

    def _take(self, block: bytes) -> int:
        checker = self.checker
        model = checker.expected_model
        if model is None or checker.failed or b"\r" in block or not (block.isascii() or is_utf8(block)):
            return 0
        rows = block.split(b"\n")
        rows.pop()  # the block ends with a newline
        # msgspec reads documents separated by any whitespace, newlines included. A row that starts with
        # "{" and ends with "}" leaves no document open (after a "}" a document goes on only with "," or a
        # bracket, never "{", and no string crosses a newline), so each row holds whole documents, at
        # least one; as many documents as rows is then one per row. The smallest and the largest row
        # start with "{" only if every row does (whitespace sorts before it, so no row is blank).
        if (
            min(rows)[:1] != b"{"
            or max(rows)[:1] != b"{"
            or sum(map(bytes.endswith, rows, repeat(b"}"))) != len(rows)
            or (len(block) > checker.max_line_bytes and max(map(len, rows)) > checker.max_line_bytes)
        ):
            return 0
        try:
            lines = self._decoder(model)(block)
        except CODEC_ERRORS:
            return 0
        count = len(rows)
        if len(lines) != count:
            return 0
        if self.estimator is not None and not self.estimator.bodies([line.body for line in lines]):
            return 0
        ids = [line.custom_id for line in lines]
        checker.accept_block(ids)
        return count
