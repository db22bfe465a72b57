from __future__ import annotations

import importlib
import json
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
from packaging.utils import canonicalize_name

from airflow_provider_llmbatch.get_provider_info import PORT_PLACEHOLDER, get_provider_info
from airflow_provider_llmbatch.vendors import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def _schema(name: str) -> dict:
    return json.loads(files("airflow").joinpath(name).read_text())


@pytest.fixture(scope="module")
def info() -> dict:
    return get_provider_info()


def test_valid_against_airflow_schema(info):
    jsonschema.validate(info, _schema("provider_info.schema.json"))


def test_package_name_matches_the_distribution(info):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert info["package-name"] == "airflow-provider-llmbatch"
    assert canonicalize_name(project["name"]) == info["package-name"]
    entry = project["entry-points"]["apache_airflow_provider"]["provider_info"]
    module, func = entry.split(":")
    assert getattr(importlib.import_module(module), func)() == info


def test_one_connection_type_per_vendor(info):
    types = {c["connection-type"]: c for c in info["connection-types"]}
    assert set(types) == {spec.conn_type for spec in REGISTRY.values()}


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=list(REGISTRY))
def test_connection_type_entry(info, spec):
    entry = next(c for c in info["connection-types"] if c["connection-type"] == spec.conn_type)
    behaviour = entry["ui-field-behaviour"]
    # Port stays in the form: Airflow 3.3.2's Test button is refused for a connection stored without one
    # (tests/test_connection_test_button.py presses it).
    assert set(behaviour["hidden-fields"]) == {"schema", "login"}
    assert behaviour["relabeling"] == {"password": "API Key", "host": "Base URL"}
    assert behaviour["placeholders"]["host"] == spec.default_base_url
    assert behaviour["placeholders"]["port"] == PORT_PLACEHOLDER
    # Airflow validates the behaviour (in python-style keys) against this schema at discovery.
    jsonschema.validate(
        {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        },
        _schema("customized_form_field_behaviours.schema.json"),
    )
    fields = entry["conn-fields"]
    assert list(fields) == [f.name for f in spec.all_conn_fields()]
    for field in spec.all_conn_fields():
        declared = fields[field.name]
        assert declared["label"] == field.label
        assert declared["description"] == field.description
        assert field.type in declared["schema"]["type"]
        assert declared["schema"].get("default") == field.default
        assert declared["schema"].get("enum") == (list(field.enum) if field.enum else None)
        assert (declared["schema"].get("format") == "password") == field.secret
        # Each field's schema is itself a valid JSON schema the UI can use.
        jsonschema.Draft7Validator.check_schema(declared["schema"])
        if field.default is not None:
            jsonschema.validate(field.default, declared["schema"])


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=list(REGISTRY))
def test_hook_class_matches_the_connection_type(info, spec):
    entry = next(c for c in info["connection-types"] if c["connection-type"] == spec.conn_type)
    module, _, name = entry["hook-class-name"].rpartition(".")
    hook_class = getattr(importlib.import_module(module), name)
    assert hook_class.conn_type == spec.conn_type
    assert hook_class.hook_name == entry["hook-name"]
    assert hook_class.conn_name_attr
    assert hook_class.default_conn_name


def test_hook_classes_are_named_after_the_registry(info):
    from airflow_provider_llmbatch.hooks import batch as hooks

    names = {c["connection-type"]: c["hook-class-name"] for c in info["connection-types"]}
    assert names == {
        REGISTRY["zhipu"].conn_type: "airflow_provider_llmbatch.hooks.batch.ZhipuBatchHook",
        REGISTRY["moonshot"].conn_type: "airflow_provider_llmbatch.hooks.batch.MoonshotBatchHook",
        REGISTRY["dashscope"].conn_type: "airflow_provider_llmbatch.hooks.batch.DashscopeBatchHook",
        REGISTRY["openai"].conn_type: "airflow_provider_llmbatch.hooks.batch.OpenaiBatchHook",
    }
    for conn_type, path in names.items():
        hook_class = getattr(hooks, path.rpartition(".")[2])
        assert hook_class is hooks.VENDOR_HOOKS[conn_type]
        assert issubclass(hook_class, hooks.BatchHook)
        assert hook_class.__module__ == "airflow_provider_llmbatch.hooks.batch"


def test_listed_modules_and_classes_import(info):
    for section in ("operators", "sensors", "hooks", "triggers"):
        for group in info[section]:
            for module in group["python-modules"]:
                importlib.import_module(module)
    for path in info["extra-links"]:
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name)().name


def test_providers_manager_reads_our_ui_metadata(info, monkeypatch):
    from airflow.providers_manager import ProviderInfo, ProvidersManager

    manager = ProvidersManager.__new__(ProvidersManager)
    ProvidersManager.__init__(manager)
    manager._provider_dict = {info["package-name"]: ProviderInfo("0.0.0", info)}
    manager._load_ui_metadata()
    for spec in REGISTRY.values():
        assert manager._field_behaviours[spec.conn_type]["relabeling"]["password"] == "API Key"
        for field in spec.all_conn_fields():
            widget = manager._connection_form_widgets[f"extra__{spec.conn_type}__{field.name}"]
            assert widget.field["schema"]["title"] == field.label
            assert widget.is_sensitive == field.secret
