"""
The vendor registry: every difference between the supported Batch APIs, as data.

One frozen :class:`~airflow_provider_llmbatch.vendor_spec.VendorSpec` per vendor, collected in
:data:`REGISTRY`. The hook, the JSONL tools, the operators, the connection forms and the emulator all read
these specs; no other module asks "which vendor is this?". Adding a vendor is one spec and one registry
line. How each vendor shapes its responses (millisecond timestamps, list pages, result lines, ...) is not
here: the client reads every variant for every vendor, and only the emulator needs to know which vendor
does what (:mod:`airflow_provider_llmbatch.emulator.vendor_dialects`).

Facts are taken from the vendors' documentation where it exists. Where a fact is a guess, it is a
setting here (and the client copes with both possibilities), never a hard-coded belief elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from airflow_provider_llmbatch import vendor_outputs as outputs
from airflow_provider_llmbatch.vendor_spec import (
    SHARED_CONN_FIELDS,
    CodeDoc,
    CompletionWindowRule,
    ConnField,
    EndpointSpec,
    ErrorDialect,
    ErrorKind,
    ExtraCreateField,
    Limits,
    ListSpec,
    VendorSpec,
)

__all__ = [
    "REGISTRY",
    "SHARED_CONN_FIELDS",
    "CodeDoc",
    "CompletionWindowRule",
    "ConnField",
    "EndpointSpec",
    "ErrorDialect",
    "ErrorKind",
    "ExtraCreateField",
    "Limits",
    "ListSpec",
    "VendorSpec",
    "vendor_for_conn_type",
]

_CHAT_WINDOW_ONLY_24H = CompletionWindowRule(min_hours=24, max_hours=24, default="24h", units="h")

# The vendors' error-code pages: every code below is recorded with the page it comes from.
ZHIPU_CODES_URL = "https://docs.z.ai/api-reference/api-code"
MOONSHOT_CODES_URL = "https://platform.kimi.ai/docs/api/errors"
DASHSCOPE_CODES_URL = "https://www.alibabacloud.com/help/en/model-studio/error-code"
OPENAI_CODES_URL = "https://platform.openai.com/docs/guides/error-codes"


ZHIPU = VendorSpec(
    name="zhipu",
    display_name="Zhipu BigModel (GLM)",
    base_urls={
        "cn": "https://open.bigmodel.cn/api/paas/v4",
        # Batch on the international host is unconfirmed; it is offered, not assumed.
        "intl": "https://api.z.ai/api/paas/v4",
    },
    endpoints=(
        EndpointSpec("/v4/chat/completions", "chat"),
        # Embeddings and images are seen in the vendor's examples only, not documented for batch.
        EndpointSpec("/v4/embeddings", "embeddings", max_requests=10_000),
        EndpointSpec("/v4/images/generations", "images"),
    ),
    # Deprecated upstream: ignored, may be null, echoed as "24h"; the vendor cancels after 7 days.
    completion_window=CompletionWindowRule(min_hours=0, max_hours=10_000, default=None, ignored=True),
    # Doc: at most 1,000 stored batch files per account.
    limits=Limits(max_requests=50_000, max_file_bytes=100 * 1024**2, max_batch_files=1000),
    extra_create_fields=(
        ExtraCreateField(
            name="auto_delete_input_file",
            type="boolean",
            description="Delete the input file once the batch is done (the vendor's default is true).",
        ),
    ),
    batch_list=ListSpec(params=frozenset({"after", "limit"})),
    file_list=ListSpec(params=frozenset({"after", "purpose", "order", "limit"})),
    errors=ErrorDialect(
        request_id_headers=("x-request-id", "x-log-id"),
        codes={
            "bad_request": (400, "1214"),
            "authentication": (401, "1000"),
            "permission_denied": (434, "1220"),
            "not_found": (404, "404"),
            "conflict": (400, "1210"),
            "file_too_large": (435, "435"),
            "rate_limit": (429, "1302"),
            "quota_exceeded": (429, "1113"),
            "server": (500, "500"),
        },
        # Account codes come with HTTP 429 ("account anomaly"): a locked account is no rate limit to retry.
        code_kinds={
            "1110": "permission_denied",
            "1111": "authentication",
            "1112": "permission_denied",
            "1113": "quota_exceeded",
            "1121": "permission_denied",
            "1301": "bad_request",
            "1302": "rate_limit",
        },
        retryable_codes=frozenset({"1302", "1234", "500"}),
        code_table=CodeDoc.table(
            ZHIPU_CODES_URL,
            {
                "500": (500, "internal error"),
                "1000": (401, "authentication failed"),
                "1110": (429, "account inactive"),
                "1111": (429, "account does not exist"),
                "1112": (429, "account locked"),
                "1113": (429, "account in arrears: recharge"),
                "1121": (429, "account locked for irregular activity"),
                "1210": (400, "incorrect API call parameters (also a finished batch's cancel: a guess)"),
                "1211": (400, "model does not exist (not an unknown batch)"),
                "1214": (400, "invalid parameter"),
                "1220": (434, "no permission to access the API"),
                "1234": (None, "network error"),
                "1301": (None, "unsafe or sensitive content"),
                "1302": (429, "concurrency too high"),
                # Only the HTTP status is documented for these; the emulator repeats it as the code, the
                # way Zhipu's own code 500 does. The hook classifies them by the HTTP status.
                "404": (404, "unknown batch or file: HTTP 404 ('task does not exist'), no code", False),
                "435": (435, "file over 100 MB: HTTP 435, no business code", False),
            },
        ),
    ),
    # The international console is not known: no link there rather than the Chinese account's console.
    console_urls={"cn": "https://open.bigmodel.cn/console/batch?batch_id={batch_id}"},
    structured_output=outputs.ZHIPU_OUTPUT,
)

MOONSHOT = VendorSpec(
    name="moonshot",
    display_name="Moonshot (Kimi)",
    base_urls={"cn": "https://api.moonshot.cn/v1", "intl": "https://api.moonshot.ai/v1"},
    endpoints=(EndpointSpec("/v1/chat/completions", "chat"),),
    completion_window=CompletionWindowRule(min_hours=12, max_hours=7 * 24, default="24h"),
    # The request limit is a guess (the other vendors' figure).
    # Doc: 1,000 batch files per organisation.
    limits=Limits(max_requests=50_000, max_file_bytes=100 * 1024**2, max_batch_files=1000),
    forbidden_body_keys=frozenset({"temperature", "top_p", "n", "presence_penalty", "frequency_penalty"}),
    batch_list=ListSpec(params=frozenset({"after", "limit"})),
    # No parameters, no has_more, `after` ignored: the pager must stop on its own.
    file_list=ListSpec(params=frozenset(), max_limit=None),
    errors=ErrorDialect(
        request_id_headers=("x-request-id", "msh-request-id"),
        codes={
            "bad_request": (400, "invalid_request_error"),
            "authentication": (401, "invalid_authentication_error"),
            "permission_denied": (403, "permission_denied_error"),
            "not_found": (404, "resource_not_found_error"),
            "conflict": (400, "invalid_request_error"),
            "file_too_large": (400, "invalid_request_error"),
            "rate_limit": (429, "rate_limit_reached_error"),
            "quota_exceeded": (429, "exceeded_current_quota_error"),
            "server": (500, "server_error"),
        },
        code_kinds={
            "exceeded_current_quota_error": "quota_exceeded",
            "engine_overloaded_error": "rate_limit",
            "rate_limit_reached_error": "rate_limit",
            "resource_not_found_error": "not_found",
        },
        # Rate limits, overload and server errors are transient.
        retryable_codes=frozenset({"rate_limit_reached_error", "engine_overloaded_error", "server_error"}),
        code_table=CodeDoc.table(
            MOONSHOT_CODES_URL,
            {
                "invalid_request_error": (400, "invalid request; also a file over 100 MB, or too many files"),
                "invalid_authentication_error": (401, "authentication failed"),
                "permission_denied_error": (403, "the API is not open to this account"),
                "resource_not_found_error": (404, "model or resource not found"),
                "rate_limit_reached_error": (429, "rate limit reached"),
                "engine_overloaded_error": (429, "engine overloaded"),
                "exceeded_current_quota_error": (429, "quota exceeded: check the balance"),
                "server_error": (500, "server error"),
            },
        ),
    ),
    console_urls={
        "cn": "https://platform.moonshot.cn/console/batch?batch_id={batch_id}",
        "intl": "https://platform.moonshot.ai/console/batch?batch_id={batch_id}",
    },
    structured_output=outputs.MOONSHOT_OUTPUT,
)

DASHSCOPE = VendorSpec(
    name="dashscope",
    display_name="Alibaba DashScope (Qwen)",
    base_urls={
        "cn-beijing": "https://dashscope.aliyuncs.com/compatible-mode/v1",
        "ap-singapore": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
    },
    endpoints=(
        EndpointSpec("/v1/chat/completions", "chat"),
        EndpointSpec("/v1/embeddings", "embeddings"),
        # Free test endpoint: one fixed model, at most 100 lines and 1 MB.
        EndpointSpec(
            "/v1/chat/ds-test",
            "test",
            max_requests=100,
            max_file_bytes=1024**2,
            required_model="batch-test-model",
        ),
    ),
    completion_window=CompletionWindowRule(min_hours=24, max_hours=336, default="24h"),
    limits=Limits(
        max_requests=50_000,
        max_file_bytes=500 * 1024**2,
        max_line_bytes=6 * 1024**2,
        max_batch_files=10_000,  # doc: 10,000 files (100 GB) stored
        metadata_value_chars_by_key={"ds_name": 100, "ds_description": 200},
    ),
    extra_create_fields=(
        ExtraCreateField("ds_name", "string", "A display name for the batch (≤100 chars).", in_metadata=True),
        ExtraCreateField(
            "ds_description", "string", "A description of the batch (≤200 chars).", in_metadata=True
        ),
        ExtraCreateField(
            "ds_batch_finish_callback",
            "string",
            "A URL the vendor calls when the batch finishes.",
            in_metadata=True,
        ),
    ),
    # create_after/create_before: yyyyMMddHHmmss (doc); read in Beijing time, UTC+8 (guess: the docs give no
    # zone, and the console shows Beijing time). A datetime is converted; a naive one is refused.
    batch_list=ListSpec(
        params=frozenset(
            {"after", "limit", "ds_name", "input_file_ids", "status", "create_after", "create_before"}
        ),
        time_params=frozenset({"create_after", "create_before"}),
        time_format="%Y%m%d%H%M%S",
        time_zone=8.0,
    ),
    file_list=ListSpec(
        params=frozenset({"after", "limit", "purpose", "create_after", "create_before"}),
        max_limit=2000,
        time_params=frozenset({"create_after", "create_before"}),
        time_format="%Y%m%d%H%M%S",
        time_zone=8.0,
    ),
    errors=ErrorDialect(
        request_id_headers=("x-request-id", "x-dashscope-request-id"),
        codes={
            "bad_request": (400, "InvalidParameter"),
            "authentication": (401, "invalid_api_key"),
            "permission_denied": (403, "AccessDenied"),
            "not_found": (404, "NotFound"),
            "conflict": (400, "InvalidParameter"),
            "file_too_large": (400, "InvalidParameter"),
            "rate_limit": (429, "Throttling.RateQuota"),
            "quota_exceeded": (400, "Arrearage"),
            "server": (500, "InternalError"),
        },
        code_kinds={"Arrearage": "quota_exceeded", "Throttling.RateQuota": "rate_limit"},
        # Transient: RequestTimeOut, ServiceUnavailable and the Throttling and InternalError families. The
        # code page names codes <family>.<detail> and lists only some of each; that an unlisted member
        # (InternalError.Timeout, Throttling.User) is as transient as its family is a guess, kept as data.
        retryable_codes=frozenset({"Throttling", "InternalError", "RequestTimeOut", "ServiceUnavailable"}),
        retryable_prefixes=("Throttling.", "InternalError."),
        code_table=CodeDoc.table(
            DASHSCOPE_CODES_URL,
            {
                # Also what a cancel of a finished batch and a file over 500 MB get (a guess: undocumented).
                "InvalidParameter": (400, "invalid parameter"),
                "Arrearage": (400, "account overdue: access denied until it is in good standing"),
                "invalid_api_key": (401, "invalid API key (InvalidApiKey in the native API)"),
                "AccessDenied": (403, "access denied"),
                "NotFound": (404, "model, resource or path not found"),
                "Throttling": (429, "rate limited"),
                "Throttling.RateQuota": (429, "request rate limit reached"),
                "Throttling.AllocationQuota": (429, "token rate limit reached"),
                "Throttling.BurstRate": (429, "burst rate limit reached"),
                "InternalError": (500, "internal error"),
                "InternalError.Algo": (500, "internal algorithm error"),
                "RequestTimeOut": (None, "request timed out"),
                "ServiceUnavailable": (503, "service unavailable"),
            },
        ),
    ),
    # Doc: only output and error files can be downloaded.
    input_content_downloadable=False,
    console_urls={
        "cn-beijing": "https://bailian.console.aliyun.com/?tab=model#/batch-inference?batch_id={batch_id}",
        "ap-singapore": (
            "https://modelstudio.console.alibabacloud.com/?tab=model#/batch-inference?batch_id={batch_id}"
        ),
    },
    conn_fields=(
        ConnField(
            name="workspace",
            label="Workspace ID",
            description="DashScope workspace (sub-account space) to bill; sent as X-DashScope-WorkSpace.",
            header="X-DashScope-WorkSpace",
        ),
    ),
    structured_output=outputs.DASHSCOPE_OUTPUT,
)

OPENAI = VendorSpec(
    name="openai",
    display_name="OpenAI-compatible",
    base_urls={"default": "https://api.openai.com/v1"},
    endpoints=(
        EndpointSpec("/v1/chat/completions", "chat"),
        EndpointSpec("/v1/embeddings", "embeddings"),
        EndpointSpec("/v1/responses", "responses"),
        EndpointSpec("/v1/completions", "completions"),
    ),
    completion_window=_CHAT_WINDOW_ONLY_24H,
    limits=Limits(max_requests=50_000, max_file_bytes=200 * 1024**2),
    extra_create_fields=(
        ExtraCreateField(
            "output_expires_after",
            "object",
            "When the output file expires: {'anchor': 'created_at', 'seconds': N}.",
        ),
    ),
    batch_list=ListSpec(params=frozenset({"after", "limit"})),
    file_list=ListSpec(params=frozenset({"after", "limit", "purpose", "order"}), max_limit=10_000),
    errors=ErrorDialect(
        request_id_headers=("x-request-id",),
        codes={
            "bad_request": (400, "invalid_request_error"),
            "authentication": (401, "invalid_api_key"),
            "permission_denied": (403, "permission_denied"),
            "not_found": (404, "not_found"),
            "conflict": (409, "conflict"),
            "file_too_large": (413, "file_too_large"),
            "rate_limit": (429, "rate_limit_exceeded"),
            "quota_exceeded": (429, "insufficient_quota"),
            "server": (500, "server_error"),
        },
        code_kinds={"insufficient_quota": "quota_exceeded", "rate_limit_exceeded": "rate_limit"},
        # Rate limits and server faults are transient.
        retryable_codes=frozenset({"rate_limit_exceeded", "server_error", "timeout", "service_unavailable"}),
        code_table=CodeDoc.table(
            OPENAI_CODES_URL,
            {
                "invalid_request_error": (400, "invalid request (an error type)"),
                "invalid_api_key": (401, "incorrect API key"),
                "rate_limit_exceeded": (429, "rate limit reached"),
                "insufficient_quota": (429, "quota exceeded: check plan and billing"),
                "server_error": (500, "server error (an error type)"),
                "service_unavailable": (503, "overloaded or unavailable"),
                # Compatible servers differ; these follow the HTTP status, the hook reads them by it.
                "permission_denied": (403, "permission denied (compatible servers)", False),
                "not_found": (404, "not found (compatible servers)", False),
                "conflict": (409, "conflict (compatible servers)", False),
                "file_too_large": (413, "file too large (compatible servers)", False),
                "timeout": (None, "request timed out (a failed request's code)", False),
            },
        ),
    ),
    cancel_terminal_status=409,
    console_urls={"default": "https://platform.openai.com/batches/{batch_id}"},
    conn_fields=tuple(
        ConnField(name, label, f"Sent as {header} where the endpoint uses it.", header=header)
        for name, label, header in (
            ("organization", "Organization", "OpenAI-Organization"),
            ("project", "Project", "OpenAI-Project"),
        )
    ),
    structured_output=outputs.OPENAI_OUTPUT,
)

REGISTRY: Mapping[str, VendorSpec] = MappingProxyType(
    {s.name: s for s in (ZHIPU, MOONSHOT, DASHSCOPE, OPENAI)}
)
"""Every supported vendor by name."""

_BY_CONN_TYPE: Mapping[str, VendorSpec] = MappingProxyType({s.conn_type: s for s in REGISTRY.values()})


def vendor_for_conn_type(conn_type: str | None) -> VendorSpec:
    """
    Return the vendor a connection type belongs to.

    :param conn_type: an Airflow connection type such as ``llmbatch_zhipu``.
    :raises KeyError: with the known types, when ``conn_type`` is not one of ours.
    """
    try:
        return _BY_CONN_TYPE[conn_type or ""]
    except KeyError:
        known = ", ".join(sorted(_BY_CONN_TYPE))
        raise KeyError(
            f"connection type {conn_type!r} is not an LLM batch connection; use one of: {known}"
        ) from None
