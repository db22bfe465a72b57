"""
Structured output as the emulator answers it: what a vendor rejects, and answers that are JSON.

A request that asks for JSON (``response_format`` of type ``json_object`` or ``json_schema``) and matches no
canned reply (``EmulatorConfig.replies``) is answered with a JSON object built from its schema: the one in
``response_format.json_schema.schema``, or for JSON mode the one the system prompt carries
(:data:`~airflow_provider_llmbatch.schema.SCHEMA_PROMPT`). The object is deterministic: the same request
gets the same answer, and an ``enum`` value is picked by the ``custom_id`` so answers vary across requests.
A request whose ``custom_id`` matches ``EmulatorConfig.invalid_output_custom_id_pattern`` (default
``^badjson``) gets an invalid answer instead, alternating by ``custom_id`` between text that is not JSON
and a JSON object missing a required field, so results show both kinds of ``invalid_output``.

What a vendor rejects comes from the registry (``VendorSpec.structured_output``): refused in the file's
validation or as a failed request, as ``rejected_at`` says.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from airflow_provider_llmbatch.schema import SCHEMA_PROMPT
from airflow_provider_llmbatch.vendors import VendorSpec

_JSON_TYPES = frozenset({"json_object", "json_schema"})
_PROMPT_HEAD = SCHEMA_PROMPT.split("{schema}", 1)[0]
_DEPTH = 8
# Strings of a `format` pydantic models use (date, datetime, UUID, ...): a value the format takes.
_FORMATS = {
    "date": "2026-01-02",
    "date-time": "2026-01-02T03:04:05Z",
    "time": "03:04:05",
    "duration": "P1D",
    "email": "reviewer@example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "uri": "https://example.com/",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}
NOT_JSON_ANSWER = "Sorry, I can only answer this in prose: the review reads as mixed."
"""The invalid answer that is not JSON."""

# Documented by DashScope and answered the same way by OpenAI.
_JSON_WORD_MESSAGE = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."
)


def rejection(spec: VendorSpec, body: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return ``(param, message)`` when ``spec``'s vendor rejects the body's ``response_format``."""
    rules = spec.structured_output
    if rules is None:
        unsupported = ("body.response_format", "response_format is not supported")
        return unsupported if "response_format" in body else None
    found = rules.check(body)
    if found is None:
        return None
    param, expected, got = found
    if param == "body.messages":
        return param, _JSON_WORD_MESSAGE
    return param, f"{param}: expected {expected}, got {got}"


def rejected_at_upload(spec: VendorSpec) -> bool:
    """Return whether the vendor refuses a rejected ``response_format`` in the file's validation."""
    return spec.structured_output is not None and spec.structured_output.rejected_at == "file"


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8])


def schema_of(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the JSON Schema a request asks its answer to match ({} for JSON mode without one), or None."""
    fmt = body.get("response_format")
    if not isinstance(fmt, Mapping) or fmt.get("type") not in _JSON_TYPES:
        return None
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if isinstance(schema, dict):
        return schema
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) and _PROMPT_HEAD in content:
            try:
                found = json.loads(content.split(_PROMPT_HEAD, 1)[1])
            except ValueError:
                continue
            if isinstance(found, dict):
                return found
    return {}


def example(schema: Any, root: Mapping[str, Any], seed: str, depth: int = 0) -> Any:
    """Return a value matching ``schema`` (resolving local ``$ref``), picked deterministically by ``seed``."""
    if not isinstance(schema, Mapping) or depth > _DEPTH:
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key, {}) if isinstance(target, Mapping) else {}
        return example(target, root, seed, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][_digest(seed) % len(schema["enum"])]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")]
            return example((usable or options)[0], root, seed, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        return {name: example(sub, root, f"{seed}/{name}", depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 1)
        return [example(schema.get("items", {}), root, f"{seed}/{i}", depth + 1) for i in range(count)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 100))
        if kind == "integer" and "minimum" not in schema and "exclusiveMinimum" in schema:
            low += 1  # an integer above an exclusive minimum
        value = low + _digest(seed) % max(int(high - low), 1)
        return int(value) if kind == "integer" else float(value) + 0.5 * (value < high - 0.5)
    if kind == "boolean":
        return _digest(seed) % 2 == 0
    if kind == "null":
        return None
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    text = f"text-{_digest(seed) % 10_000}"
    if isinstance(schema.get("minLength"), int):
        text = text.ljust(schema["minLength"], "x")
    return text[: schema["maxLength"]] if isinstance(schema.get("maxLength"), int) else text


def json_answer(body: Mapping[str, Any], custom_id: str, invalid: bool) -> str | None:
    """
    Return the answer text to a request that asks for JSON, or None when it does not.

    :param invalid: answer invalidly: text that is not JSON, or JSON missing a required field.
    """
    schema = schema_of(body)
    if schema is None:
        return None
    # JSON mode with no schema to go by: an empty object is still a JSON object.
    value = example(schema, schema, custom_id) if schema else {}
    if invalid:
        required = schema.get("required")
        if _digest(custom_id, "invalid") % 2 and isinstance(value, dict) and required:
            value.pop(required[0], None)
        else:
            return NOT_JSON_ANSWER
    return json.dumps(value if value is not None else {}, ensure_ascii=False, separators=(",", ":"))
