"""
The shape a model's answer must have: :class:`OutputSchema`, from a JSON Schema dict or a pydantic model.

The same object builds the vendor's structured-output field when requests are made (see
:class:`~airflow_provider_llmbatch.vendor_spec.StructuredOutputSpec`) and validates every answer on our
side when results are fetched, whatever the vendor promised: :meth:`OutputSchema.parse` turns the
answer's text into a JSON-ready value or a short error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\r?\n(.*?)\r?\n?```$", re.DOTALL)
_MAX_ERROR = 300
"""Errors are cut to this many characters: they travel into manifests and logs."""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 1] + "…"


def schema_name(title: object) -> str:
    """Return ``title`` as vendors take a schema name: ``[A-Za-z0-9_-]``, 1-64 characters, else ``output``."""
    # The vendors' `json_schema.name` allows [A-Za-z0-9_-], at most 64 characters.
    name = _NAME_BAD.sub("_", title).strip("_")[:64] if isinstance(title, str) else ""
    return name or "output"


def _strict_ok(node: Any) -> bool:
    """Return True when every object in ``node`` closes its properties and requires them all."""
    if isinstance(node, Mapping):
        if node.get("type") == "object" or "properties" in node:
            props = node.get("properties", {})
            if node.get("additionalProperties") is not False:
                return False
            if not isinstance(props, Mapping) or set(node.get("required", ())) != set(props):
                return False
        return all(_strict_ok(v) for v in node.values())
    if isinstance(node, list):
        return all(_strict_ok(v) for v in node)
    return True


def _location(path: Any) -> str:
    return ".".join(str(p) for p in path) or "(root)"


def unwrap_answer(text: str) -> str:
    """
    Return a model's JSON answer without what models put around it: whitespace, a byte order mark and a
    Markdown code fence (```` ```json ... ``` ````); any other text comes back stripped.
    """
    stripped = text.strip().lstrip("\ufeff").strip()
    fenced = _FENCE.match(stripped)
    return fenced.group(1).strip() if fenced else stripped


@dataclass(frozen=True, eq=False)
class OutputSchema:
    """
    A JSON Schema answers are asked for and checked against; build it with :meth:`of`.

    :param name: the schema's name as sent to the vendor: the model class name, else the schema's
        ``title``, else ``output`` (characters other than ``[A-Za-z0-9_-]`` become ``_``).
    :param json_schema: the JSON Schema (a pydantic model's ``model_json_schema()``).
    :param model: the pydantic model class, or None for a dict schema.
    :param strict: True when the schema meets the strict-mode rules of vendors that have one (every object
        sets ``additionalProperties: false`` and requires all its properties); sent as ``strict``.
    """

    name: str
    json_schema: dict[str, Any]
    model: type[BaseModel] | None = None
    strict: bool = False
    _validator: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, value: object) -> OutputSchema:
        """
        Return the output schema for a JSON Schema dict or a pydantic ``BaseModel`` subclass.

        :raises InvalidInputError: for anything else, or a dict that is not a valid JSON Schema.
        """
        # Imported here: the registry imports this module, and Airflow imports the registry.
        import jsonschema

        from airflow_provider_llmbatch.exceptions import InvalidInputError

        if isinstance(value, OutputSchema):
            return value
        if isinstance(value, type) and issubclass(value, BaseModel):
            schema = value.model_json_schema()
            return cls(
                name=schema_name(value.__name__), json_schema=schema, model=value, strict=_strict_ok(schema)
            )
        if isinstance(value, Mapping):
            schema = json.loads(json.dumps(value))  # a plain, JSON-only copy the caller cannot change
            if not isinstance(schema, dict):
                raise InvalidInputError("output_schema: expected a JSON Schema object")
            try:
                validator_cls = jsonschema.validators.validator_for(schema)
                validator_cls.check_schema(schema)
            except jsonschema.SchemaError as err:
                where = _location(err.path)
                raise InvalidInputError(
                    f"output_schema is not a valid JSON Schema at {where}: {_short(err.message)}"
                ) from None
            return cls(
                name=schema_name(schema.get("title")),
                json_schema=schema,
                strict=_strict_ok(schema),
                _validator=validator_cls(schema),
            )
        what = value.__name__ if isinstance(value, type) else type(value).__name__
        raise InvalidInputError(
            f"output_schema: expected a JSON Schema dict or a pydantic BaseModel subclass, got {what}"
        )

    def validate(self, value: Any) -> tuple[Any, str | None]:
        """Return ``(value ready for JSON, None)`` if ``value`` matches the schema, else ``(None, error)``."""
        if self.model is not None:
            try:
                # By alias: the output has the keys of the schema the vendor was sent (and Parquet columns).
                return self.model.model_validate(value).model_dump(mode="json", by_alias=True), None
            except ValidationError as err:
                errors = err.errors(include_url=False, include_input=False)
                first = errors[0]
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                return None, _short(f"{_location(first['loc'])}: {first['msg']}{more}")
        from jsonschema.exceptions import best_match

        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return value, None
        return None, _short(f"{_location(error.absolute_path)}: {error.message}")

    def parse(self, text: str) -> tuple[Any, str | None]:
        """
        Return the answer ``text`` decoded and validated: ``(value, None)`` or ``(None, error)``.

        A byte order mark and a Markdown code fence around the JSON (```` ```json ... ``` ````) are removed
        first.
        """
        try:
            value = json.loads(unwrap_answer(text))
        except ValueError as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not JSON"
            where = (
                f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
            )
            return None, f"the answer is not JSON: {reason}{where}"
        return self.validate(value)

    def output_json_schema(self) -> dict[str, Any]:
        """
        Return the JSON Schema of the values :meth:`validate` returns (what lands as ``output``).

        For a pydantic model it is the serialization schema (keys by alias, types as dumped to JSON);
        for a dict schema it is the schema itself.
        """
        if self.model is not None:
            return self.model.model_json_schema(mode="serialization")
        return self.json_schema

    def prompt_text(self) -> str:
        """Return the schema as compact JSON text, for vendors that take it in the system prompt."""
        return json.dumps(self.json_schema, ensure_ascii=False, separators=(",", ":"))


ResponseFormatType = Literal["text", "json_object", "json_schema"]
"""The ``response_format.type`` values of the OpenAI chat API that vendors copy."""

SCHEMA_PROMPT = (
    "Answer with one JSON object and nothing else (no Markdown, no code fence). "
    "It must match this JSON Schema:\n{schema}"
)
"""The system-prompt text that carries the schema where a vendor has JSON mode only (``{schema}``: the
schema as compact JSON). It names JSON, as vendors that check for the word require."""

_JSON_WORD = re.compile(r"json", re.IGNORECASE)


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "\n".join(parts)


@dataclass(frozen=True)
class StructuredOutputSpec:
    """
    How a vendor takes structured output in a chat request body (``response_format``), from its docs.

    :param request_type: what an ``output_schema`` is sent as: ``json_schema`` (the schema in
        ``response_format.json_schema``: name, schema, strict) or ``json_object`` (JSON mode, with the
        schema in the system prompt as :attr:`schema_prompt` says).
    :param accepted_types: the ``response_format.type`` values the vendor takes; it rejects any other.
    :param source: the URL of the vendor's page on structured output.
    :param schema_prompt: the system-prompt text carrying the schema (``{schema}``), for ``json_object``.
    :param json_word_required: the vendor rejects ``json_object`` unless the messages contain "json".
    :param strict_needs_closed_schema: the vendor rejects ``strict: true`` with a schema whose objects
        do not set ``additionalProperties: false`` and require every property.
    :param rejected_at: where the vendor refuses a ``response_format`` it rejects: ``file`` (the request
        file's validation, at the stage the vendor validates files) or ``row`` (that request fails and
        lands in the error file).
    :param notes: what is a guess, and anything else worth knowing.
    """

    request_type: Literal["json_schema", "json_object"]
    accepted_types: frozenset[ResponseFormatType]
    source: str
    schema_prompt: str = SCHEMA_PROMPT
    json_word_required: bool = False
    strict_needs_closed_schema: bool = False
    rejected_at: Literal["file", "row"] = "row"
    notes: str = ""

    def apply(self, body: dict[str, Any], schema: OutputSchema) -> str | None:
        """
        Add the structured-output request to a chat ``body`` in place; return why it cannot be, or None.

        A body with its own ``response_format`` is left as it is (it is checked like any request line).
        """
        if "response_format" in body:
            return None
        if self.request_type == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema.name, "schema": schema.json_schema, "strict": schema.strict},
            }
            return None
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "messages (a list) to carry the schema in the system prompt"
        text = self.schema_prompt.format(schema=schema.prompt_text())
        first = messages[0] if messages else None
        if (
            isinstance(first, Mapping)
            and first.get("role") == "system"
            and isinstance(first.get("content"), str)
        ):
            messages = [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
        else:
            messages = [{"role": "system", "content": text}, *messages]
        body["messages"] = messages
        body["response_format"] = {"type": "json_object"}
        return None

    def check(self, body: Mapping[str, Any]) -> tuple[str, str, str] | None:
        """Return ``(field, expected, got)`` if the vendor rejects the body's ``response_format``."""
        value = body.get("response_format")
        if value is None:
            return None
        accepted = ", ".join(repr(t) for t in sorted(self.accepted_types))
        if not isinstance(value, Mapping) or value.get("type") not in self.accepted_types:
            got = repr(value.get("type")) if isinstance(value, Mapping) else type(value).__name__
            return "body.response_format.type", f"one of {accepted}", _short(got)
        kind = value["type"]
        if (
            kind == "json_object"
            and self.json_word_required
            and not _JSON_WORD.search(_messages_text(body.get("messages")))
        ):
            return "body.messages", "the word 'json' in the messages (required with json_object)", "none"
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
                return (
                    "body.response_format.json_schema",
                    "an object with a 'schema' object",
                    type(spec).__name__,
                )
            name = spec.get("name")
            if not isinstance(name, str) or not name or _NAME_BAD.search(name) or len(name) > 64:
                return (
                    "body.response_format.json_schema.name",
                    "1-64 characters of [A-Za-z0-9_-]",
                    _short(repr(name)),
                )
            if (
                self.strict_needs_closed_schema
                and spec.get("strict") is True
                and not _strict_ok(spec["schema"])
            ):
                return (
                    "body.response_format.json_schema.schema",
                    "additionalProperties: false and every property required in each object (strict: true)",
                    "a schema that leaves objects open",
                )
        return None
