"""
Part of the vendor registry: how each vendor takes structured output, with the page each fact is from.

Read through ``VendorSpec.structured_output`` (:mod:`airflow_provider_llmbatch.vendors`); the shape is
:class:`~airflow_provider_llmbatch.schema.StructuredOutputSpec`. Where a vendor offers a full JSON Schema
(``response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``) the schema
travels there; where it offers JSON mode only (``{"type": "json_object"}``) the schema travels in the
system prompt (:data:`~airflow_provider_llmbatch.schema.SCHEMA_PROMPT`). Either way every answer is
validated against the schema on our side when results are fetched.
"""

from __future__ import annotations

from airflow_provider_llmbatch.schema import StructuredOutputSpec

ZHIPU_OUTPUT = StructuredOutputSpec(
    request_type="json_object",
    # Doc: JSON mode is `{"type": "json_object"}`, the structure is described in the system message;
    # the chat API takes `text` and `json_object` only (no schema-constrained mode).
    accepted_types=frozenset({"text", "json_object"}),
    source="https://docs.z.ai/guides/capabilities/struct-output",
    notes="Where a rejected response_format is refused (a failed request, code 1214) is a guess.",
)

MOONSHOT_OUTPUT = StructuredOutputSpec(
    request_type="json_object",
    # Doc: `response_format` is `{"type": "text"}` (default) or `{"type": "json_object"}`; the JSON
    # document's fields and types go in the system or user prompt; only JSON objects are produced.
    accepted_types=frozenset({"text", "json_object"}),
    source="https://platform.moonshot.ai/docs/guide/use-json-mode-feature-of-kimi-api",
    notes="Where a rejected response_format is refused (a failed request) is a guess.",
)

DASHSCOPE_OUTPUT = StructuredOutputSpec(
    request_type="json_schema",
    # Doc: JSON Object mode and JSON Schema mode (`{"type": "json_schema", "json_schema": {...,
    # "strict": true}}`, Qwen3-max/plus/flash and later snapshots); JSON Object mode fails with
    # "'messages' must contain the word 'json' in some form, to use 'response_format' of type
    # 'json_object'." when no message says JSON.
    accepted_types=frozenset({"text", "json_object", "json_schema"}),
    source="https://www.alibabacloud.com/help/en/model-studio/qwen-structured-output",
    json_word_required=True,
    notes="JSON Schema mode is limited to some models; others answer the request with an error.",
)

OPENAI_OUTPUT = StructuredOutputSpec(
    request_type="json_schema",
    # Doc: Structured Outputs, `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
    # with strict every object must set additionalProperties false and require all its properties.
    # JSON mode needs the word JSON in the messages, or the request is refused.
    accepted_types=frozenset({"text", "json_object", "json_schema"}),
    source="https://platform.openai.com/docs/guides/structured-outputs",
    json_word_required=True,
    strict_needs_closed_schema=True,
)
