"""
The request file of a ``@task.llm_batch`` batch: its lines, its structured-output directive, its checks.

common-ai hands an adapter a list of prompts; this module turns them into the vendor's request lines
(``custom_id`` as common-ai expects it, ``<key16>-<index>``) and writes them with
:func:`~airflow_provider_llmbatch.jsonl.build_request_file`, so every rule of the vendor in the registry
(one model per file, forbidden body keys, line, file and request limits) is checked before anything is
sent, with the line, field and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.ai.exceptions import LLMBatchInputError

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.jsonl import RequestFileReport, build_request_file
from airflow_provider_llmbatch.vendors import EndpointSpec, VendorSpec

if TYPE_CHECKING:
    from airflow.providers.common.ai.batch.base import BatchRequest
    from airflow.providers.common.ai.batch.output_schema import OutputSpec

StructuredMode = Literal["json_schema", "json_object"]
"""How a vendor is asked for structured output: a JSON Schema it enforces, or JSON mode plus the schema."""

JSON_SCHEMA_VENDORS: frozenset[str] = frozenset({"openai"})
"""
Registry vendor names whose Batch API documents ``response_format: {"type": "json_schema"}``.

Only the OpenAI API documents it; Zhipu, Moonshot and DashScope document JSON mode
(``{"type": "json_object"}``) only, so they get JSON mode with the schema in the system message, and
common-ai validates every answer against the schema (``invalid_output`` rows). A vendor added to the
registry starts in JSON mode, which every OpenAI-compatible API accepts.
"""


def structured_mode(vendor: VendorSpec) -> StructuredMode:
    """Return how ``vendor`` is asked for structured output."""
    return "json_schema" if vendor.name in JSON_SCHEMA_VENDORS else "json_object"


SCHEMA_INSTRUCTION = (
    "Answer with a single JSON object and nothing else. It must validate against this JSON Schema:\n{schema}"
)
"""The system-message text that carries the schema to a vendor in JSON mode."""


def chat_endpoint(vendor: VendorSpec) -> EndpointSpec:
    """Return the vendor's chat-completions batch endpoint, the one ``@task.llm_batch`` prompts go to."""
    return next(e for e in vendor.endpoints if e.kind == "chat")


@dataclass(frozen=True)
class LineSettings:
    """
    What every line of one batch shares.

    :param vendor: the vendor's registry spec.
    :param model: the bare model name (the part after ``<prefix>:``).
    :param key16: common-ai's short identity key: each ``custom_id`` is ``<key16>-<index>``.
    :param system_prompt: the system prompt of requests that set none of their own.
    :param max_tokens: the output token cap of requests that set none of their own.
    :param request_params: body fields merged into every request (a request's own ``params`` win).
    :param output_spec: common-ai's structured-output request.
    """

    vendor: VendorSpec
    model: str
    key16: str
    system_prompt: str
    max_tokens: int
    request_params: Mapping[str, Any] | None
    output_spec: OutputSpec

    @property
    def endpoint(self) -> EndpointSpec:
        """Return the batch endpoint every line names."""
        return chat_endpoint(self.vendor)


def output_directive(vendor: VendorSpec, spec: OutputSpec) -> dict[str, Any]:
    """Return the body fields that ask ``vendor`` for ``spec``'s structured output (``{}`` for plain text)."""
    if not spec.is_structured:
        return {}
    if structured_mode(vendor) == "json_schema":
        # strict=False, as common-ai's own OpenAI adapter: strict mode rewrites the user's schema.
        schema = {"name": spec.schema_name, "schema": spec.json_schema, "strict": False}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    return {"response_format": {"type": "json_object"}}


def schema_instruction(vendor: VendorSpec, spec: OutputSpec) -> str | None:
    """Return the system-message text a vendor in JSON mode needs to know the schema, or None."""
    if not spec.is_structured or structured_mode(vendor) == "json_schema":
        return None
    return SCHEMA_INSTRUCTION.format(schema=json.dumps(spec.json_schema, ensure_ascii=False))


def iter_lines(
    requests: Sequence[BatchRequest], settings: LineSettings, models: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """
    Yield one request line per prompt, in input order.

    :param requests: common-ai's normalized requests.
    :param settings: what the lines share.
    :param models: each request's resolved bare model (one per request).
    """
    directive = output_directive(settings.vendor, settings.output_spec)
    instruction = schema_instruction(settings.vendor, settings.output_spec)
    url = settings.endpoint.path
    for index, (request, model) in enumerate(zip(requests, models, strict=True)):
        system = request.get("system_prompt") or settings.system_prompt
        if instruction:
            system = f"{system}\n\n{instruction}" if system else instruction
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": request["prompt"]})
        # User params first, then the fields the adapter manages, so a stray "model" or "messages" in the
        # params can neither bypass the one-model rule nor replace the prompt.
        body: dict[str, Any] = {
            **(settings.request_params or {}),
            **(request.get("params") or {}),
            "model": model,
            "messages": messages,
            "max_tokens": request.get("max_tokens") or settings.max_tokens,
            **directive,
        }
        yield {"custom_id": f"{settings.key16}-{index}", "method": "POST", "url": url, "body": body}


def write_request_file(
    requests: Sequence[BatchRequest],
    settings: LineSettings,
    models: Sequence[str],
    destination: Path,
    *,
    whole_input: bool = False,
) -> RequestFileReport:
    """
    Write the batch's request file, checked line by line against the vendor's rules as it is written.

    :param destination: a local ``.jsonl`` path; it appears only once complete and valid.
    :param whole_input: skip the per-file request and size limits (the caller judges them itself).
    :raises LLMBatchInputError: naming every problem (``line N`` is request ``N - 1``); nothing is sent.
    """
    try:
        return build_request_file(
            iter_lines(requests, settings, models),
            destination,
            settings.vendor,
            settings.endpoint.path,
            whole_input=whole_input,
        )
    except InvalidInputError as exc:
        raise LLMBatchInputError(
            f"{settings.vendor.display_name} would reject this batch; nothing was sent (line N of the "
            f"request file is request N - 1 of the input). {exc}"
        ) from exc
