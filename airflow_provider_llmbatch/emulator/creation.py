"""Check a create-batch body against the vendor's rules: endpoint, window, metadata, extra fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmbatch.emulator.errors import ApiError
from airflow_provider_llmbatch.vendors import VendorSpec

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "string": (str,),
    "object": (dict,),
    "integer": (int,),
}


@dataclass
class CreateParams:
    """
    A checked create-batch request.

    :param input_file_id: the request file.
    :param endpoint: the batch endpoint.
    :param completion_window: as sent (None where the vendor ignores it).
    :param metadata: as sent.
    :param extra: the vendor-only top-level fields sent.
    """

    input_file_id: str
    endpoint: str
    completion_window: str | None
    metadata: dict[str, str] | None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_create_body(spec: VendorSpec, body: Any) -> CreateParams:
    """Return the checked parameters; raise :class:`ApiError` (400) naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError("bad_request", "expected a JSON object body")
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise ApiError(
            "bad_request", "expected input_file_id to be a non-empty string", param="input_file_id"
        )
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or spec.endpoint(endpoint) is None:
        known = ", ".join(e.path for e in spec.endpoints)
        raise ApiError("bad_request", f"expected endpoint one of {known}, got {endpoint!r}", param="endpoint")
    window = body.get("completion_window")
    rule = spec.completion_window
    if window is None and not rule.ignored:
        raise ApiError("bad_request", "completion_window is required", param="completion_window")
    if window is not None and not isinstance(window, str):
        raise ApiError("bad_request", f"expected a string window, got {window!r}", param="completion_window")
    problem = rule.check(window)
    if problem:
        raise ApiError("bad_request", problem, param="completion_window")
    metadata = _metadata(spec, body.get("metadata"))
    extra: dict[str, Any] = {}
    for extra_field in spec.extra_create_fields:
        if extra_field.in_metadata or extra_field.name not in body:
            continue
        value = body[extra_field.name]
        types = _JSON_TYPES[extra_field.type]
        if value is not None and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            message = f"expected {extra_field.name} to be a {extra_field.type}, got {value!r}"
            raise ApiError("bad_request", message, param=extra_field.name)
        extra[extra_field.name] = value
    return CreateParams(input_file_id, endpoint, window, metadata, extra)


def _metadata(spec: VendorSpec, value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError("bad_request", "expected metadata to be an object", param="metadata")
    limits = spec.limits
    if len(value) > limits.metadata_pairs:
        message = f"expected at most {limits.metadata_pairs} metadata pairs, got {len(value)}"
        raise ApiError("bad_request", message, param="metadata")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ApiError("bad_request", f"expected metadata[{key!r}] to be a string", param="metadata")
        if len(key) > limits.metadata_key_chars:
            message = f"expected metadata keys of at most {limits.metadata_key_chars} characters, got {key!r}"
            raise ApiError("bad_request", message, param="metadata")
        cap = limits.metadata_value_chars_by_key.get(key, limits.metadata_value_chars)
        if len(item) > cap:
            message = f"expected metadata[{key!r}] of at most {cap} characters, got {len(item)}"
            raise ApiError("bad_request", message, param="metadata")
    return dict(value)
