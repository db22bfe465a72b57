"""
Batch adapters for Airflow's AI provider: ``@task.llm_batch`` on Zhipu, Moonshot, DashScope and more.

Installed with the ``common-ai`` extra (``pip install "airflow-provider-llmbatch[common-ai]"``); common-ai
finds them through the ``airflow.providers.common.ai.batch_adapters`` entry points. Nothing else in the
provider imports this package, so the provider works without common-ai.
"""

from __future__ import annotations

try:
    from airflow.providers.common.ai.batch.base import BatchAdapter as _BatchAdapter  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in an environment without the extra
    from airflow.sdk.exceptions import AirflowOptionalProviderFeatureException

    raise AirflowOptionalProviderFeatureException(
        "The llmbatch adapters for @task.llm_batch need Airflow's AI provider: "
        'pip install "airflow-provider-llmbatch[common-ai]"'
    ) from exc

from airflow_provider_llmbatch.common_ai.adapter import (
    ADAPTERS,
    DashScopeBatchAdapter,
    MoonshotBatchAdapter,
    OpenAICompatibleBatchAdapter,
    VendorBatchAdapter,
    ZhipuBatchAdapter,
    model_prefix,
)

__all__ = [
    "ADAPTERS",
    "DashScopeBatchAdapter",
    "MoonshotBatchAdapter",
    "OpenAICompatibleBatchAdapter",
    "VendorBatchAdapter",
    "ZhipuBatchAdapter",
    "model_prefix",
]
