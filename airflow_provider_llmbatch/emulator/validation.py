"""One streaming pass over a request file: the checks every vendor documents, read from its spec."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from airflow_provider_llmbatch.emulator.records import FileInfo, Problem
from airflow_provider_llmbatch.emulator.structured import rejected_at_upload, rejection
from airflow_provider_llmbatch.vendors import VendorSpec


class _Collector:
    def __init__(self, info: FileInfo, cap: int) -> None:
        self.info = info
        self.cap = cap

    def add(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.info.problems) < self.cap:
            self.info.problems.append(Problem(code, message, line, param))


REJECTED_FORMAT = 3
"""The ``fail_flags`` value of a request the vendor fails for its ``response_format``."""


def scan_request_file(
    path: Path,
    spec: VendorSpec,
    endpoint: str | None,
    fail_pattern: re.Pattern[str],
    *,
    max_problems: int = 20,
    fails_once: Callable[[str], bool] = lambda _: False,
) -> FileInfo:
    """
    Validate a request file line by line and note which requests are to fail.

    :param path: the file on disk.
    :param spec: the vendor whose rules apply.
    :param endpoint: the batch endpoint every ``url`` must equal; None (at upload) accepts any endpoint of
        the vendor, as long as all lines agree.
    :param fail_pattern: ``custom_id`` values matching it are marked to fail (flag 1).
    :param fails_once: whether a ``custom_id`` fails this time, rate limited (flag 2).
    :param max_problems: problems kept.
    """
    info = FileInfo()
    out = _Collector(info, max_problems)
    seen: set[str] = set()
    max_line = spec.limits.max_line_bytes
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            info.bytes += len(raw)
            if not raw.strip():
                continue
            info.lines += 1
            if max_line is not None and len(raw) > max_line:
                out.add("line_too_large", f"expected at most {max_line} bytes, got {len(raw)}", number)
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                if isinstance(exc, RecursionError):
                    detail = "nested too deeply"
                out.add("invalid_json", f"expected a JSON object, got invalid JSON ({detail})", number)
                info.fail_flags.append(0)
                continue
            if not isinstance(record, dict):
                out.add("invalid_json", f"expected a JSON object, got {type(record).__name__}", number)
                info.fail_flags.append(0)
                continue
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                out.add("missing_custom_id", "expected a non-empty string custom_id", number, "custom_id")
                custom_id = ""
            elif custom_id in seen:
                out.add("duplicate_custom_id", f"custom_id {custom_id!r} is not unique", number, "custom_id")
            seen.add(custom_id)
            flag = 1 if custom_id and fail_pattern.search(custom_id) else 0
            info.fail_flags.append(2 if not flag and custom_id and fails_once(custom_id) else flag)
            if _check_line(record, number, spec, endpoint, info, out):
                info.fail_flags[-1] = REJECTED_FORMAT
    if info.lines == 0:
        out.add("empty_file", "expected at least one request line, got an empty file")
    _check_limits(spec, endpoint or info.url, info, out)
    return info


def _check_line(
    record: dict[str, object],
    number: int,
    spec: VendorSpec,
    endpoint: str | None,
    info: FileInfo,
    out: _Collector,
) -> bool:
    """Check one line; return True when the vendor fails this request for its ``response_format``."""
    method = record.get("method")
    if method != "POST":
        out.add("invalid_method", f"expected method 'POST', got {method!r}", number, "method")
    url = record.get("url")
    if endpoint is not None and url != endpoint:
        out.add("invalid_url", f"expected url {endpoint!r} (the batch endpoint), got {url!r}", number, "url")
    elif endpoint is None:
        if not isinstance(url, str) or spec.endpoint(url) is None:
            known = ", ".join(e.path for e in spec.endpoints)
            out.add("invalid_url", f"expected url one of {known}, got {url!r}", number, "url")
        elif info.url is not None and url != info.url:
            out.add("mixed_urls", f"expected url {info.url!r} like line 1, got {url!r}", number, "url")
    if info.url is None and isinstance(url, str):
        info.url = url
    body = record.get("body")
    if not isinstance(body, dict):
        out.add("invalid_body", f"expected body to be an object, got {type(body).__name__}", number, "body")
        return False
    model = body.get("model")
    if not isinstance(model, str) or not model:
        out.add("missing_model", "expected body.model to be a non-empty string", number, "body.model")
    elif info.model is None:
        info.model = model
    elif model != info.model:
        out.add(
            "mixed_models",
            f"expected one model per file ({info.model!r}), got {model!r}",
            number,
            "body.model",
        )
    for key in sorted(spec.forbidden_body_keys & body.keys()):
        out.add("forbidden_param", f"body.{key} is not allowed in a batch request", number, f"body.{key}")
    endpoint_spec = spec.endpoint(url) if isinstance(url, str) else None
    required = endpoint_spec.required_model if endpoint_spec else None
    if required and isinstance(model, str) and model != required:
        out.add(
            "invalid_model", f"expected model {required!r} for {url}, got {model!r}", number, "body.model"
        )
    rejected = rejection(spec, body)
    if rejected is not None and rejected_at_upload(spec):
        out.add("invalid_response_format", rejected[1], number, rejected[0])
        return False
    return rejected is not None


def _check_limits(spec: VendorSpec, endpoint: str | None, info: FileInfo, out: _Collector) -> None:
    endpoint_spec = spec.endpoint(endpoint) if endpoint else None
    max_requests = spec.limits.max_requests
    max_bytes = spec.limits.max_file_bytes
    if endpoint_spec is not None:
        max_requests = min(max_requests, endpoint_spec.max_requests or max_requests)
        max_bytes = min(max_bytes, endpoint_spec.max_file_bytes or max_bytes)
    if info.lines > max_requests:
        out.add("too_many_requests", f"expected at most {max_requests} requests, got {info.lines}")
    if info.bytes > max_bytes:
        out.add("file_too_large", f"expected at most {max_bytes} bytes, got {info.bytes}")
