"""
Request lines built from records: a prompt record becomes a body, and a body asks for structured output.

:func:`~airflow_provider_llmbatch.jsonl.build_request_file` turns each record into a line here, then
checks and writes it. What differs between vendors (how structured output is asked for) comes from the
:class:`~airflow_provider_llmbatch.vendors.VendorSpec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.jsonl_lines import RequestChecker, show
from airflow_provider_llmbatch.schema import OutputSchema, StructuredOutputSpec
from airflow_provider_llmbatch.vendors import EndpointSpec, VendorSpec

STRUCTURED_KINDS = frozenset({"chat", "test"})
"""The endpoint kinds whose requests can ask for structured output (``response_format``)."""


def body_for(record: Mapping[str, Any], kind: str, system: str | None) -> dict[str, Any] | str:
    """Return a request body built from a prompt record, or why it cannot be built."""
    system = record.get("system", system)
    if kind in ("chat", "test"):
        messages = record.get("messages")
        if messages is None:
            if record.get("prompt") is None:
                return "prompt or messages"
            messages = [{"role": "user", "content": record["prompt"]}]
        if system is not None and not any(
            isinstance(m, Mapping) and m.get("role") == "system" for m in messages
        ):
            messages = [{"role": "system", "content": system}, *messages]
        return {"messages": messages}
    if kind == "responses":
        body: dict[str, Any] = {"input": record.get("input", record.get("prompt", record.get("messages")))}
        if body["input"] is None:
            return "input, prompt or messages"
        if system is not None:
            body["instructions"] = system
        return body
    key = "input" if kind == "embeddings" else "prompt"
    if record.get(key) is None:
        return key
    return {key: record[key]}


def request_for(
    record: Any,
    number: int,
    endpoint: EndpointSpec,
    checker: RequestChecker,
    model: str | None,
    custom_id_field: str | None,
    system: str | None,
    params: Mapping[str, Any] | None,
    structured: tuple[StructuredOutputSpec, OutputSchema] | None = None,
) -> dict[str, Any] | None:
    """Return the request line for one record, or None after reporting why there is none."""
    where = f"record {number}"
    if not isinstance(record, Mapping):
        checker.problem(where, "record", "a mapping", show(record))
        return None
    if custom_id_field is None:
        custom_id = record.get("custom_id") or f"request-{number}"
    else:
        custom_id = record.get(custom_id_field)
        if isinstance(custom_id, int) and not isinstance(custom_id, bool):
            custom_id = str(custom_id)
        if custom_id is None:
            checker.problem(where, custom_id_field, "the request's custom id", "nothing (the key is missing)")
            return None
    if "body" in record:
        body = record["body"]
        if not isinstance(body, Mapping):
            checker.problem(where, "body", "an object", show(body))
            return None
        body = dict(body)
    else:
        built = body_for(record, endpoint.kind, system)
        if isinstance(built, str):
            keys = ", ".join(sorted(map(str, record))) or "none"
            checker.problem(
                where, "record", f"body or {built} for a {endpoint.kind} endpoint", f"the keys {keys}"
            )
            return None
        own = record.get("params") or {}
        if not isinstance(own, Mapping):
            checker.problem(where, "params", "an object of body fields", show(own))
            return None
        body = {**(params or {}), **built, **own}
    if model is not None and body.setdefault("model", model) != model:
        checker.problem(where, "body.model", f"{model!r} (the model argument)", show(body["model"]))
    if structured is not None:
        missing = structured[0].apply(body, structured[1])
        if missing is not None:
            checker.problem(
                where, "body", f"{missing} (output_schema)", f"the keys {', '.join(sorted(body))}"
            )
            return None
    line = {
        "custom_id": custom_id,
        "method": record.get("method", "POST"),
        "url": record.get("url", endpoint.path),
        "body": body,
    }
    # Every field, not only the body: bytes or a UUID as custom_id would otherwise arrive as other text.
    for name, value in line.items():
        changed = codec.inexact(value, name)
        if changed is not None:
            checker.problem(where, changed[0], "a value JSON carries as it is", changed[1])
            return None
    return line


def structured_for(
    spec: VendorSpec, endpoint: EndpointSpec, output_schema: Any
) -> tuple[StructuredOutputSpec, OutputSchema] | None:
    """Return how the vendor takes ``output_schema`` and the schema, or None without one."""
    if output_schema is None:
        return None
    schema = OutputSchema.of(output_schema)
    if spec.structured_output is None:
        raise InvalidInputError(f"output_schema: {spec.display_name} has no structured output")
    if endpoint.kind not in STRUCTURED_KINDS:
        raise InvalidInputError(
            f"output_schema applies to chat endpoints, not {endpoint.path} ({endpoint.kind})"
        )
    return spec.structured_output, schema
