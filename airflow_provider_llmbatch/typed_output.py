"""
The typed answer of a result row: the answer's text read out of a response body, parsed and validated.

With an output schema, every succeeded response is read once, in the results join: its answer text is
found by the body's shape (whatever the vendor), then parsed and validated on our side with
:meth:`~airflow_provider_llmbatch.schema.OutputSchema.parse`, whatever the vendor promised. A response
whose answer does not parse or validate becomes an ``invalid_output`` row, with the reason in its error.

Where the answer text is:

=====================  =====================================================================
response body          answer text
=====================  =====================================================================
chat completions       ``choices[0].message.content`` (a list of parts: their ``text`` joined)
completions            ``choices[0].text``
responses              the ``output_text`` parts of the ``message`` items of ``output``, joined
anything else          none: the row is ``invalid_output`` ("the response has no answer text")
=====================  =====================================================================

Embeddings and image batches have no answer text; the fetch refuses an output schema for them up front
(:data:`UNTYPED_KINDS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from airflow_provider_llmbatch.schema import OutputSchema

INVALID_OUTPUT: Final = "invalid_output"
"""The row status, and the error code, of a response whose answer does not parse or validate."""

UNTYPED_KINDS = frozenset({"embeddings", "images"})
"""Endpoint kinds whose responses have no answer text to validate."""


def _parts_text(parts: list[Any], kinds: tuple[str, ...]) -> str | None:
    texts = [
        p["text"]
        for p in parts
        if isinstance(p, Mapping) and p.get("type", "text") in kinds and isinstance(p.get("text"), str)
    ]
    return "".join(texts) if texts else None


def _refusal(source: Mapping[str, Any]) -> str | None:
    refusal = source.get("refusal")
    return refusal if isinstance(refusal, str) and refusal else None


def _chat_or_completion(choice: Mapping[str, Any]) -> tuple[str | None, str | None]:
    message = choice.get("message")
    if isinstance(message, Mapping):
        content = message.get("content")
        if isinstance(content, str):
            return content, None
        if isinstance(content, list) and (text := _parts_text(content, ("text", "output_text"))) is not None:
            return text, None
        refusal = _refusal(message)
        return None, f"the model refused: {refusal}" if refusal else "the answer has no text content"
    text = choice.get("text")
    if isinstance(text, str):
        return text, None
    return None, "the response has no answer text"


def _responses(output: list[Any]) -> tuple[str | None, str | None]:
    texts: list[str] = []
    refusals: list[str] = []
    for item in output:
        if not isinstance(item, Mapping) or item.get("type") != "message":
            continue
        content = item.get("content")
        if not isinstance(content, list):
            continue
        if (text := _parts_text(content, ("output_text",))) is not None:
            texts.append(text)
        refusals += [r for part in content if isinstance(part, Mapping) and (r := _refusal(part))]
    if texts:
        return "".join(texts), None
    if refusals:
        return None, f"the model refused: {refusals[0]}"
    return None, "the response has no answer text"


def answer_text(body: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """
    Return the answer text of a response body (see the module's table), or why there is none.

    :return: ``(text, None)``, or ``(None, reason)``.
    """
    if not body:
        return None, "the response has no body"
    choices = body.get("choices")
    if isinstance(choices, list):
        if not choices or not isinstance(choices[0], Mapping):
            return None, "the response has no choices"
        return _chat_or_completion(choices[0])
    output = body.get("output")
    if isinstance(output, list):
        return _responses(output)
    return None, "the response has no answer text"


def _finish_reason(body: Mapping[str, Any]) -> str | None:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        reason = choices[0].get("finish_reason")
        return reason if isinstance(reason, str) else None
    details = body.get("incomplete_details")
    if isinstance(details, Mapping) and details.get("reason") == "max_output_tokens":
        return "length"
    return None


def typed_output(body: Mapping[str, Any] | None, schema: OutputSchema) -> tuple[Any, str | None]:
    """
    Return a succeeded response's answer, parsed and validated against ``schema``.

    :param body: the response body.
    :param schema: the output schema.
    :return: ``(value, None)`` with the value ready for JSON, or ``(None, error)`` saying why the
        answer is not a valid output (an answer cut off at the token limit says so).
    """
    text, missing = answer_text(body)
    if text is None:
        return None, missing
    value, error = schema.parse(text)
    if error is not None and body is not None and _finish_reason(body) == "length":
        error = f"the answer was cut off at the token limit (finish_reason length); {error}"
    return value, error
