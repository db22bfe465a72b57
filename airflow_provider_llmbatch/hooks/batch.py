"""
The Batch API hook: one request-building core, a sync face for workers and an async face for triggers.

Like httpx's ``BaseClient``: requests are built and responses read in
:mod:`~airflow_provider_llmbatch.hooks._core`; the sync face (``httpx.Client`` per hook) and the async
face (``a``-prefixed methods on an ``httpx.AsyncClient`` shared by every hook on the event loop) add only
the I/O. Retries follow the one policy in :mod:`airflow_provider_llmbatch.retry`.
"""

from __future__ import annotations

from collections.abc import Mapping

from airflow_provider_llmbatch.hooks._async import AsyncFace
from airflow_provider_llmbatch.hooks._sync import SyncFace
from airflow_provider_llmbatch.vendors import REGISTRY


class BatchHook(SyncFace, AsyncFace):
    """
    Talk to an LLM Batch API (Zhipu, Moonshot, DashScope or any OpenAI-compatible one).

    The connection decides the vendor: its type (``llmbatch_<vendor>``) picks the registry spec. The
    password is the API key; the host is the base URL (empty: the registry's URL for extra ``region``);
    extras ``timeout``, ``max_retries`` and the vendor's header fields apply.

    :param llmbatch_conn_id: the Airflow connection id (default: ``llmbatch_default``).
    :param timeout: seconds per request, overriding the connection's ``timeout`` extra.
    :param retry_policy: the retry policy, overriding the one built from the connection's ``max_retries``.
    """

    conn_name_attr = "llmbatch_conn_id"
    default_conn_name = "llmbatch_default"
    conn_type = REGISTRY["openai"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['openai'].display_name})"


class ZhipuBatchHook(BatchHook):
    """Talk to the Zhipu BigModel (GLM) Batch API; connection type ``llmbatch_zhipu``."""

    conn_type = REGISTRY["zhipu"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['zhipu'].display_name})"


class MoonshotBatchHook(BatchHook):
    """Talk to the Moonshot (Kimi) Batch API; connection type ``llmbatch_moonshot``."""

    conn_type = REGISTRY["moonshot"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['moonshot'].display_name})"


class DashScopeBatchHook(BatchHook):
    """Talk to the Alibaba DashScope (Qwen) Batch API; connection type ``llmbatch_dashscope``."""

    conn_type = REGISTRY["dashscope"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['dashscope'].display_name})"


class OpenAIBatchHook(BatchHook):
    """Talk to an OpenAI-compatible Batch API; connection type ``llmbatch_openai``."""

    conn_type = REGISTRY["openai"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['openai'].display_name})"


VENDOR_HOOKS: Mapping[str, type[BatchHook]] = {
    hook.conn_type: hook for hook in (ZhipuBatchHook, MoonshotBatchHook, DashScopeBatchHook, OpenAIBatchHook)
}
"""Connection type -> hook class, for the provider info."""
