"""
Create-batch arguments, checked against the vendor's rules before anything is uploaded or sent.

The operators check a task's arguments here before the upload (:func:`check_create_args`), and the
hook builds the create body here (:func:`create_body`): one set of rules, whoever asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.vendors import ExtraCreateField, VendorSpec

RESERVED_PREFIX = "llmbatch_"
"""Metadata keys the provider writes itself; a user's metadata may not use the prefix."""

IDEMPOTENCY_KEY = "llmbatch_idem"
"""Metadata key the hook tags every create with, so a create of unknown effect can be found again."""

IDEMPOTENCY_KEY_LENGTH = 32
"""Hex characters of an idempotency key (a uuid4)."""


def check_user_metadata(metadata: Mapping[str, Any]) -> None:
    """
    Refuse user metadata that uses the provider's ``llmbatch_`` namespace.

    :raises InvalidInputError: naming the key.
    """
    for name in metadata:
        if isinstance(name, str) and name.startswith(RESERVED_PREFIX):
            raise InvalidInputError(
                f"metadata key {name!r}: keys starting with {RESERVED_PREFIX!r} are reserved for the provider"
            )


def create_arguments(
    vendor: VendorSpec,
    *,
    endpoint: str | None,
    completion_window: str | None,
    metadata: Mapping[str, str] | None,
    extra: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """
    Check create-batch arguments against the vendor's spec; return the body fields and the merged metadata.

    The body holds ``endpoint``, ``completion_window`` and the vendor's extra fields; fields the vendor
    carries inside ``metadata`` (DashScope ``ds_*``) are merged into the returned metadata instead.

    :raises InvalidInputError: naming the argument and what the vendor accepts.
    """
    endpoint = endpoint or vendor.default_endpoint
    if vendor.endpoint(endpoint) is None:
        allowed = ", ".join(e.path for e in vendor.endpoints)
        raise InvalidInputError(
            f"{vendor.display_name} does not accept endpoint {endpoint!r}; use one of: {allowed}"
        )
    rule = vendor.completion_window
    window = completion_window if completion_window is not None else rule.default
    problem = rule.check(window)
    if problem:
        raise InvalidInputError(f"completion_window for {vendor.display_name}: {problem}")
    merged: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidInputError(f"metadata must map strings to strings, got {name!r}: {value!r}")
        merged[name] = value
    body: dict[str, Any] = {"endpoint": endpoint, "completion_window": window}
    fields = {f.name: f for f in vendor.extra_create_fields}
    for name, value in (extra or {}).items():
        spec = fields.get(name)
        if spec is None:
            allowed = ", ".join(fields) or "none"
            raise InvalidInputError(f"{vendor.display_name} has no create field {name!r}; allowed: {allowed}")
        _check_extra_type(spec, value)
        if spec.in_metadata:
            if name in merged and merged[name] != value:
                raise InvalidInputError(f"{name!r} is given both in metadata and in extra, differently")
            merged[name] = value
        else:
            body[name] = value
    return body, merged


def check_metadata(vendor: VendorSpec, metadata: Mapping[str, str]) -> None:
    """
    Check metadata against the vendor's pair, key and value limits.

    :raises InvalidInputError: naming the key and the limit.
    """
    limits = vendor.limits
    if len(metadata) > limits.metadata_pairs:
        raise InvalidInputError(
            f"{vendor.display_name} accepts at most {limits.metadata_pairs} metadata pairs, "
            f"got {len(metadata)}"
        )
    for k, v in metadata.items():
        if not k or len(k) > limits.metadata_key_chars:
            raise InvalidInputError(
                f"metadata key {k!r}: expected 1 to {limits.metadata_key_chars} characters, got {len(k)}"
            )
        most = limits.metadata_value_chars_by_key.get(k, limits.metadata_value_chars)
        if len(v) > most:
            raise InvalidInputError(
                f"metadata value of {k!r}: expected at most {most} characters, got {len(v)}"
            )


def _check_extra_type(spec: ExtraCreateField, value: Any) -> None:
    ok = {
        "boolean": isinstance(value, bool),
        "string": isinstance(value, str),
        "object": isinstance(value, Mapping),
        "integer": isinstance(value, int) and not isinstance(value, bool),
    }[spec.type]
    if not ok:
        raise InvalidInputError(
            f"create field {spec.name!r} expects a {spec.type}, got {type(value).__name__}"
        )


def check_create_args(
    vendor: VendorSpec,
    *,
    endpoint: str | None = None,
    completion_window: str | None = None,
    metadata: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """
    Check create-batch arguments before anything is uploaded, exactly as :func:`create_body` will.

    ``metadata`` is what will be sent besides the idempotency key, which is counted in.

    :raises InvalidInputError: naming the argument and what the vendor accepts.
    """
    _, merged = create_arguments(
        vendor, endpoint=endpoint, completion_window=completion_window, metadata=metadata, extra=extra
    )
    check_metadata(vendor, {**merged, IDEMPOTENCY_KEY: "0" * IDEMPOTENCY_KEY_LENGTH})


def create_body(
    vendor: VendorSpec,
    *,
    input_file_id: str,
    endpoint: str | None,
    completion_window: str | None,
    metadata: Mapping[str, str] | None,
    extra: Mapping[str, Any] | None,
    idempotency_key: str,
) -> dict[str, Any]:
    """
    Return the create-batch body: checked arguments, the metadata and the idempotency key.

    :raises InvalidInputError: naming the argument and what the vendor accepts.
    """
    if IDEMPOTENCY_KEY in (metadata or {}):
        raise InvalidInputError(f"metadata key {IDEMPOTENCY_KEY!r} is set by the hook itself")
    body, merged = create_arguments(
        vendor, endpoint=endpoint, completion_window=completion_window, metadata=metadata, extra=extra
    )
    merged[IDEMPOTENCY_KEY] = idempotency_key
    check_metadata(vendor, merged)
    return {"input_file_id": input_file_id, **body, "metadata": merged}
