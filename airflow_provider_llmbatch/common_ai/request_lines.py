"""
The request file of a ``@task.llm_batch`` batch: its lines, its structured-output directive, its checks.

common-ai hands an adapter a list of prompts; this module turns them into the vendor's request lines
(``custom_id`` as common-ai expects it, ``<key16>-<index>``) and writes them with
:func:`~airflow_provider_llmbatch.jsonl.build_request_file`, so every rule of the vendor in the registry
(one model per file, forbidden body keys, line, file and request limits) is checked before anything is
sent, with the line, field and what was expected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.common.ai.exceptions import LLMBatchInputError

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.jsonl import RequestFileReport, build_request_file
from airflow_provider_llmbatch.schema import OutputSchema, schema_name
from airflow_provider_llmbatch.vendors import EndpointSpec, VendorSpec

if TYPE_CHECKING:
    from airflow.providers.common.ai.batch.base import BatchRequest
    from airflow.providers.common.ai.batch.output_schema import OutputSpec


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


def output_schema(vendor: VendorSpec, spec: OutputSpec) -> OutputSchema | None:
    """
    Return common-ai's output spec as the provider's :class:`OutputSchema`, or None for plain text.

    How it is asked for is the registry's (``VendorSpec.structured_output``), as for the provider's own
    operators. ``strict`` stays false, as in common-ai's own OpenAI adapter (strict mode would refuse
    many user schemas); common-ai validates every answer itself (``invalid_output`` rows).
    :raises LLMBatchInputError: the vendor has no structured output in the registry.
    """
    if not spec.is_structured:
        return None
    if vendor.structured_output is None:
        raise LLMBatchInputError(f"{vendor.display_name} has no structured output; remove output_type")
    schema = OutputSchema.of(spec.json_schema)
    return dataclasses.replace(schema, name=schema_name(spec.schema_name), strict=False)


def output_directive(vendor: VendorSpec, spec: OutputSpec) -> dict[str, Any]:
    """Return the body fields that ask ``vendor`` for ``spec``'s structured output (``{}`` for plain text)."""
    schema = output_schema(vendor, spec)
    if schema is None or vendor.structured_output is None:
        return {}
    body: dict[str, Any] = {"messages": []}
    vendor.structured_output.apply(body, schema)
    return {"response_format": body["response_format"]}


def iter_lines(
    requests: Sequence[BatchRequest], settings: LineSettings, models: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """
    Yield one request line per prompt, in input order.

    :param requests: common-ai's normalized requests.
    :param settings: what the lines share.
    :param models: each request's resolved bare model (one per request).
    """
    schema = output_schema(settings.vendor, settings.output_spec)
    structured = settings.vendor.structured_output
    url = settings.endpoint.path
    for index, (request, model) in enumerate(zip(requests, models, strict=True)):
        system = request.get("system_prompt") or settings.system_prompt
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
        }
        if schema is not None and structured is not None:
            body.pop("response_format", None)  # the output type decides it, not a stray request param
            structured.apply(body, schema)
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
