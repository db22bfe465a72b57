"""The provider's registration with Airflow, generated from the vendor registry."""

from __future__ import annotations

from typing import Any

from airflow_provider_llmbatch.vendors import REGISTRY, ConnField, VendorSpec

PACKAGE_NAME = "airflow-provider-llmbatch"
"""The distribution name; Airflow matches it against the installed package."""

INTEGRATION_NAME = "LLM Batch"

_HOOKS_MODULE = "airflow_provider_llmbatch.hooks.batch"

PORT_PLACEHOLDER = "443 (used when the Base URL has no port)"
"""What the connection form shows in the empty Port field."""


def hook_class_name(spec: VendorSpec) -> str:
    """Return the name of the vendor's hook class in ``hooks.batch`` (``zhipu`` -> ``ZhipuBatchHook``)."""
    return "".join(part.capitalize() for part in spec.name.replace("-", "_").split("_")) + "BatchHook"


def _conn_field(field: ConnField) -> dict[str, Any]:
    # Nullable: every extra is optional in the form; an empty one falls back to the default.
    schema: dict[str, Any] = {"type": [field.type, "null"]}
    if field.default is not None:
        schema["default"] = field.default
    if field.enum is not None:
        schema["enum"] = list(field.enum)
    if field.secret:
        schema["format"] = "password"
    return {"label": field.label, "description": field.description, "schema": schema}


def connection_type(spec: VendorSpec) -> dict[str, Any]:
    """Return the ``connection-types`` entry of one vendor."""
    return {
        "connection-type": spec.conn_type,
        "hook-class-name": f"{_HOOKS_MODULE}.{hook_class_name(spec)}",
        "hook-name": f"LLM Batch ({spec.display_name})",
        # `port` stays visible: on Airflow 3.3.2 the UI's Test button is refused for a connection without
        # one (it sends port 0 for a stored NULL, which the API reads as another destination), so the form
        # has to let users store one. The Base URL's own port, when it has one, wins.
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "login"],
            "relabeling": {"password": "API Key", "host": "Base URL"},
            "placeholders": {
                "host": spec.default_base_url,
                "password": f"{spec.display_name} API key",
                "port": PORT_PLACEHOLDER,
            },
        },
        "conn-fields": {field.name: _conn_field(field) for field in spec.all_conn_fields()},
    }


def get_provider_info() -> dict[str, Any]:
    """Return the provider's metadata for Airflow's providers manager."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "LLM Batch",
        "description": (
            "Run LLM Batch API jobs on Zhipu BigModel (GLM), Moonshot (Kimi), Alibaba DashScope (Qwen) "
            "and any OpenAI-compatible endpoint."
        ),
        "integrations": [
            {
                "integration-name": INTEGRATION_NAME,
                "external-doc-url": "https://pypi.org/project/airflow-provider-llmbatch/",
                "tags": ["ai", "llm"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": [
                    "airflow_provider_llmbatch.operators.batch",
                    "airflow_provider_llmbatch.operators.cancel",
                    "airflow_provider_llmbatch.operators.cleanup",
                    "airflow_provider_llmbatch.operators.results",
                    "airflow_provider_llmbatch.operators.run",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": ["airflow_provider_llmbatch.sensors.batch"],
            }
        ],
        "hooks": [{"integration-name": INTEGRATION_NAME, "python-modules": [_HOOKS_MODULE]}],
        "triggers": [
            {
                "integration-name": INTEGRATION_NAME,
                "python-modules": ["airflow_provider_llmbatch.triggers.batch"],
            }
        ],
        "connection-types": [connection_type(spec) for spec in REGISTRY.values()],
        "extra-links": ["airflow_provider_llmbatch.links.batch.BatchConsoleLink"],
        "task-decorators": [
            {"name": "llmbatch", "class-name": "airflow_provider_llmbatch.decorators.llmbatch.llmbatch_task"}
        ],
    }
