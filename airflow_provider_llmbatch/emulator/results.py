"""Output and error files in each vendor's line format, with deterministic fake completions."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_llmbatch.emulator.records import BatchRecord
from airflow_provider_llmbatch.emulator.structured import json_answer, rejection
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.vendors import VendorSpec

_ECHO_CHARS = 200
_EMBEDDING_DIMS = 8


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _prompt(body: dict[str, Any]) -> tuple[str, int]:
    """Return the last user text and the word count of every message (the prompt's 'tokens')."""
    messages = body.get("messages")
    if isinstance(messages, list):
        texts = [(m.get("role"), _text_of(m.get("content"))) for m in messages if isinstance(m, dict)]
        last = next((t for role, t in reversed(texts) if role == "user"), texts[-1][1] if texts else "")
        return last, sum(_words(t) for _, t in texts)
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            return value, _words(value)
        if isinstance(value, list):
            text = " ".join(_text_of(v) if not isinstance(v, str) else v for v in value)
            return text, _words(text)
    return "", 0


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _vector(text: str) -> list[float]:
    raw = hashlib.sha256(text.encode()).digest()
    return [round((b - 127.5) / 127.5, 6) for b in raw[:_EMBEDDING_DIMS]]


def fake_body(
    kind: str,
    custom_id: str,
    body: dict[str, Any],
    created: int,
    reply_to: Callable[[str], str | None] = lambda _: None,
    invalid_output: Callable[[str], bool] = lambda _: False,
) -> dict[str, Any]:
    """Return a deterministic response body for one request of an endpoint kind."""
    text, prompt_tokens = _prompt(body)
    model = str(body.get("model", ""))
    reply = (
        reply_to(text)
        or json_answer(body, custom_id, invalid_output(custom_id))
        or f"echo: {text}"[:_ECHO_CHARS]
    )
    completion_tokens = _words(reply)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    ident = _digest(custom_id, model, text)[:24]
    if kind == "embeddings":
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(str(item))}
            for i, item in enumerate(items)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    if kind == "responses":
        return {
            "id": f"resp_{ident}",
            "object": "response",
            "created_at": created,
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": reply}],
                }
            ],
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    if kind == "completions":
        return {
            "id": f"cmpl-{ident}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": reply, "finish_reason": "stop"}],
            "usage": usage,
        }
    if kind == "images":
        return {"created": created, "data": [{"url": f"https://emulator.invalid/images/{ident}.png"}]}
    return {
        "id": f"chatcmpl-{ident}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _line_id(spec: VendorSpec, batch_id: str, custom_id: str) -> str:
    style = dialect_of(spec).result_format.line_id
    if style == "batch_id":
        return batch_id
    if style == "custom_id":
        return custom_id
    if style == "uuid":
        return str(uuid.uuid4())
    return f"batch_req_{uuid.uuid4().hex}"


def _response(spec: VendorSpec, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    placement = dialect_of(spec).result_format.request_id
    request_id = uuid.uuid4().hex
    if placement == "in_body":
        return {"status_code": status_code, "body": {**body, "request_id": request_id}}
    return {
        "status_code": status_code,
        "request_id": "" if placement == "empty" else request_id,
        "body": body,
    }


def success_line(spec: VendorSpec, batch_id: str, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Return an output line in the vendor's format."""
    line: dict[str, Any] = {
        "id": _line_id(spec, batch_id, custom_id),
        "custom_id": custom_id,
        "response": _response(spec, 200, body),
    }
    if dialect_of(spec).result_format.error_key_on_success:
        line["error"] = None
    return line


def error_line(
    spec: VendorSpec,
    batch_id: str,
    custom_id: str,
    code: str,
    message: str,
    *,
    with_response: bool,
    status: int = 400,
) -> dict[str, Any]:
    """Return an error line: a failed request (``status``), or (no response) a request that never ran."""
    response = None
    if with_response:
        kind = "invalid_request_error" if status == 400 else "rate_limit_error"
        error = {"code": code, "message": message, "type": kind, "param": None}
        response = _response(spec, status, {"error": error})
    return {
        "id": _line_id(spec, batch_id, custom_id),
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }


def write_results(
    spec: VendorSpec,
    batch: BatchRecord,
    output_path: Path,
    error_path: Path,
    *,
    created: int,
    unfinished_code: str | None,
    reply_to: Callable[[str], str | None] = lambda _: None,
    invalid_output: Callable[[str], bool] = lambda _: False,
) -> tuple[int, int]:
    """
    Write a finished batch's output and error files line by line; return the lines in each.

    :param unfinished_code: error code written for requests that never ran (None: they are left out).
    """
    kind = endpoint_kind(spec, batch.endpoint)
    flags = batch.info.fail_flags
    written_ok = written_err = 0
    with (
        batch.input_path.open("rb") as source,
        output_path.open("w", encoding="utf-8") as out,
        error_path.open("w", encoding="utf-8") as err,
    ):
        index = 0
        for raw in source:
            if not raw.strip() or index >= len(flags):
                continue
            record = json.loads(raw)
            custom_id = str(record.get("custom_id", ""))
            body = record.get("body") if isinstance(record.get("body"), dict) else {}
            if index < batch.processed:
                if flags[index] == 2:
                    line = error_line(
                        spec,
                        batch.id,
                        custom_id,
                        spec.errors.codes["rate_limit"][1],
                        "rate limited (emulated: it succeeds when sent again)",
                        with_response=True,
                        status=spec.errors.codes["rate_limit"][0],
                    )
                    err.write(json.dumps(line, ensure_ascii=False) + "\n")
                    written_err += 1
                elif flags[index] == 3:
                    _, message = rejection(spec, body) or ("body", "invalid response_format")
                    status, code = spec.errors.codes["bad_request"]
                    line = error_line(
                        spec, batch.id, custom_id, code, message, with_response=True, status=status
                    )
                    err.write(json.dumps(line, ensure_ascii=False) + "\n")
                    written_err += 1
                elif flags[index]:
                    line = error_line(
                        spec,
                        batch.id,
                        custom_id,
                        "invalid_request",
                        "request failed (emulated)",
                        with_response=True,
                    )
                    err.write(json.dumps(line, ensure_ascii=False) + "\n")
                    written_err += 1
                else:
                    answer = fake_body(kind, custom_id, body, created, reply_to, invalid_output)
                    line = success_line(spec, batch.id, custom_id, answer)
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                    written_ok += 1
            elif unfinished_code is not None:
                message = f"request not processed: {unfinished_code.removeprefix('batch_')}"
                line = error_line(spec, batch.id, custom_id, unfinished_code, message, with_response=False)
                err.write(json.dumps(line, ensure_ascii=False) + "\n")
                written_err += 1
            index += 1
    return written_ok, written_err


def endpoint_kind(spec: VendorSpec, endpoint: str) -> str:
    """Return what an endpoint does; the test endpoint answers like chat."""
    endpoint_spec = spec.endpoint(endpoint)
    kind = endpoint_spec.kind if endpoint_spec else "chat"
    return "chat" if kind == "test" else kind
