from __future__ import annotations

from types import SimpleNamespace

import pytest

from airflow_provider_llmbatch.links import batch as link_module
from airflow_provider_llmbatch.links.batch import BatchConsoleLink, console_url
from airflow_provider_llmbatch.vendors import REGISTRY


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=list(REGISTRY))
def test_console_url_per_vendor(spec):
    url = console_url(spec.conn_type, "batch_abc123")
    assert url == spec.console_url.format(batch_id="batch_abc123")
    assert url.startswith("https://")
    assert "batch_abc123" in url


def test_batch_id_is_quoted():
    url = console_url("llmbatch_openai", "a/b c?d")
    assert url.endswith("a%2Fb%20c%3Fd")


@pytest.mark.parametrize(
    ("conn_type", "batch_id"),
    [(None, "b"), ("", "b"), ("llmbatch_openai", None), ("llmbatch_openai", ""), ("postgres", "b")],
)
def test_unknown_gives_empty(conn_type, batch_id):
    assert console_url(conn_type, batch_id) == ""


@pytest.fixture
def xcoms(monkeypatch):
    store: dict[str, object] = {}
    calls: list[tuple[object, str]] = []

    def get_value(*, ti_key, key):
        calls.append((ti_key, key))
        return store.get(key)

    monkeypatch.setattr(link_module.XCom, "get_value", staticmethod(get_value))
    return store, calls


TI_KEY = SimpleNamespace(dag_id="d", task_id="t", run_id="r", try_number=1, map_index=-1)


def test_link_reads_xcoms(xcoms):
    store, calls = xcoms
    store.update(batch_id="batch_42", conn_type="llmbatch_zhipu")
    link = BatchConsoleLink()
    assert link.name == "Batch console"
    assert link.get_link(None, ti_key=TI_KEY) == REGISTRY["zhipu"].console_url.format(batch_id="batch_42")
    assert {key for _, key in calls} == {"batch_id", "conn_type"}
    assert all(k is TI_KEY for k, _ in calls)


@pytest.mark.parametrize(
    "pushed", [{}, {"conn_type": "llmbatch_zhipu"}, {"batch_id": "b1"}, {"batch_id": "b1", "conn_type": "x"}]
)
def test_link_empty_until_known(xcoms, pushed):
    store, _ = xcoms
    store.update(pushed)
    assert BatchConsoleLink().get_link(None, ti_key=TI_KEY) == ""
