"""Table tests of the I/O-free hook core: connection settings, request building, paging, multipart framing."""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks._core import (
    IDEMPOTENCY_KEY,
    Core,
    Pager,
    multipart_layout,
    settings_from_connection,
    source_name,
)
from airflow_provider_llmbatch.hooks._io import LineSplitter
from airflow_provider_llmbatch.models import Batch, Page
from airflow_provider_llmbatch.vendors import REGISTRY, ListSpec, VendorSpec

KEY = "sk-core-test-key-0123456789"
VENDORS = list(REGISTRY.values())


def _settings(vendor: VendorSpec, **extra: Any) -> Any:
    return settings_from_connection(
        "c1", conn_type=vendor.conn_type, host="http://127.0.0.1:9/x", password=KEY, extra=extra
    )


def _core(vendor: VendorSpec) -> Core:
    return Core(_settings(vendor))


# -- connection settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "extra", "expected"),
    [
        ("https://api.example.com/v1/", None, {}, "https://api.example.com/v1"),
        ("api.example.com/v1", None, {}, "https://api.example.com/v1"),
        ("api.example.com", 8443, {}, "https://api.example.com:8443"),
        ("http://127.0.0.1:8000/openai/v1", 9999, {}, "http://127.0.0.1:8000/openai/v1"),
        ("", None, {}, "https://dashscope.aliyuncs.com/compatible-mode/v1"),
        (None, None, {"region": "ap-singapore"}, "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"),
        ("  ", None, {"region": "cn-beijing"}, "https://dashscope.aliyuncs.com/compatible-mode/v1"),
    ],
)
def test_base_url(host: str | None, port: int | None, extra: dict[str, Any], expected: str) -> None:
    settings = settings_from_connection(
        "c1", conn_type="llmbatch_dashscope", host=host, password=KEY, extra=extra, port=port
    )
    assert settings.base_url == expected


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_every_region_of_every_vendor(vendor: VendorSpec) -> None:
    for region, url in vendor.base_urls.items():
        settings = settings_from_connection(
            "c1", conn_type=vendor.conn_type, host="", password=KEY, extra={"region": region}
        )
        assert settings.base_url == url.rstrip("/")
        assert settings.vendor is vendor


def test_unknown_region_names_the_choices() -> None:
    with pytest.raises(InvalidInputError, match="cn, intl"):
        settings_from_connection(
            "c1", conn_type="llmbatch_zhipu", host="", password=KEY, extra={"region": "eu"}
        )


@pytest.mark.parametrize("password", [None, ""])
def test_missing_key_names_the_connection(password: str | None) -> None:
    with pytest.raises(InvalidInputError, match="'my_conn' has no API key"):
        settings_from_connection("my_conn", conn_type="llmbatch_openai", host="", password=password, extra={})


def test_foreign_connection_type() -> None:
    with pytest.raises(InvalidInputError, match="llmbatch_zhipu"):
        settings_from_connection("c1", conn_type="http", host="", password=KEY, extra={})


@pytest.mark.parametrize(
    ("extra", "override", "timeout", "retries"),
    [
        ({}, None, 60.0, 5),
        ({"timeout": 5, "max_retries": 0}, None, 5.0, 0),
        ({"timeout": "2.5", "max_retries": "3"}, None, 2.5, 3),
        ({"timeout": 5}, 9.0, 9.0, 5),
        ({"timeout": "", "max_retries": None}, None, 60.0, 5),
    ],
)
def test_timeout_and_retries(
    extra: dict[str, Any], override: float | None, timeout: float, retries: int
) -> None:
    settings = settings_from_connection(
        "c1", conn_type="llmbatch_openai", host="", password=KEY, extra=extra, timeout=override
    )
    assert (settings.timeout, settings.max_retries) == (timeout, retries)


@pytest.mark.parametrize(
    "extra", [{"timeout": "soon"}, {"timeout": 0}, {"max_retries": -1}, {"max_retries": "x"}]
)
def test_bad_numbers_are_input_errors(extra: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError, match="'c1'"):
        settings_from_connection("c1", conn_type="llmbatch_openai", host="", password=KEY, extra=extra)


def test_vendor_header_fields_and_the_key_stay_out_of_repr() -> None:
    settings = settings_from_connection(
        "c1",
        conn_type="llmbatch_openai",
        host="",
        password=KEY,
        extra={"organization": "org-1", "project": "", "unrelated": "x"},
    )
    assert settings.headers == {"OpenAI-Organization": "org-1"}
    headers = settings.request_headers()
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["OpenAI-Organization"] == "org-1"
    assert KEY not in repr(settings)
    ds = settings_from_connection(
        "c1", conn_type="llmbatch_dashscope", host="", password=KEY, extra={"workspace": "ws-9"}
    )
    assert ds.request_headers()["X-DashScope-WorkSpace"] == "ws-9"


def test_origin_is_the_pool_key() -> None:
    settings = settings_from_connection(
        "c1", conn_type="llmbatch_openai", host="http://127.0.0.1:8000/openai/v1", password=KEY, extra={}
    )
    assert settings.origin == "http://127.0.0.1:8000"


# -- create_batch -----------------------------------------------------------------------------------


def _body(request: Any) -> dict[str, Any]:
    return dict(json.loads(request.body))


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_create_defaults_from_the_spec(vendor: VendorSpec) -> None:
    request, key = _core(vendor).create_batch(
        input_file_id="file-1", endpoint=None, completion_window=None, metadata=None, extra=None
    )
    body = _body(request)
    assert (request.method, request.path, request.idempotent) == ("POST", "/batches", False)
    assert body["endpoint"] == vendor.default_endpoint
    assert body["completion_window"] == vendor.completion_window.default
    assert "completion_window" in body  # sent as null where the vendor ignores it
    assert key is not None
    assert body["metadata"] == {IDEMPOTENCY_KEY: key}


def test_ignored_window_is_null_unless_given() -> None:
    core = _core(REGISTRY["zhipu"])
    request, _ = core.create_batch(
        input_file_id="f", endpoint=None, completion_window=None, metadata=None, extra=None
    )
    assert _body(request)["completion_window"] is None
    request, _ = core.create_batch(
        input_file_id="f", endpoint=None, completion_window="72h", metadata=None, extra=None
    )
    assert _body(request)["completion_window"] == "72h"


@pytest.mark.parametrize(
    ("vendor", "window", "ok"),
    [
        ("moonshot", "12h", True),
        ("moonshot", "7d", True),
        ("moonshot", "8d", False),
        ("moonshot", "6h", False),
        ("dashscope", "14d", True),
        ("dashscope", "15d", False),
        ("openai", "24h", True),
        ("openai", "1d", False),
        ("openai", "48h", False),
        ("zhipu", "whenever", False),
    ],
)
def test_completion_window_is_checked(vendor: str, window: str, ok: bool) -> None:
    core = _core(REGISTRY[vendor])
    if ok:
        request, _ = core.create_batch(
            input_file_id="f", endpoint=None, completion_window=window, metadata=None, extra=None
        )
        assert _body(request)["completion_window"] == window
    else:
        with pytest.raises(InvalidInputError, match="completion_window"):
            core.create_batch(
                input_file_id="f", endpoint=None, completion_window=window, metadata=None, extra=None
            )


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_unknown_endpoint_names_the_allowed(vendor: VendorSpec) -> None:
    with pytest.raises(InvalidInputError, match=vendor.default_endpoint):
        _core(vendor).create_batch(
            input_file_id="f", endpoint="/v9/nope", completion_window=None, metadata=None, extra=None
        )


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_metadata_limits(vendor: VendorSpec) -> None:
    core, limits = _core(vendor), vendor.limits

    def create(metadata: dict[str, str]) -> Any:
        return core.create_batch(
            input_file_id="f", endpoint=None, completion_window=None, metadata=metadata, extra=None
        )

    full = {f"k{i}": "v" for i in range(limits.metadata_pairs)}
    request, key = create(full)
    # No room for the idempotency tag: the batch is created untagged (and never blindly re-created).
    assert key is None
    assert _body(request)["metadata"] == full
    with pytest.raises(InvalidInputError, match="at most"):
        create({**full, "one": "more"})
    with pytest.raises(InvalidInputError, match="metadata key"):
        create({"k" * (limits.metadata_key_chars + 1): "v"})
    with pytest.raises(InvalidInputError, match="metadata value"):
        create({"k": "v" * (limits.metadata_value_chars + 1)})
    with pytest.raises(InvalidInputError, match="strings"):
        create({"k": 1})  # type: ignore[dict-item]
    request, key = create({IDEMPOTENCY_KEY: "mine"})
    assert key == "mine"


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_extra_fields_from_the_spec(vendor: VendorSpec) -> None:
    core = _core(vendor)
    with pytest.raises(
        InvalidInputError,
        match="allowed: " + (", ".join(f.name for f in vendor.extra_create_fields) or "none"),
    ):
        core.create_batch(
            input_file_id="f", endpoint=None, completion_window=None, metadata=None, extra={"bogus": 1}
        )
    samples = {
        "boolean": False,
        "string": "x",
        "object": {"anchor": "created_at", "seconds": 3600},
        "integer": 3,
    }
    for field in vendor.extra_create_fields:
        request, _ = core.create_batch(
            input_file_id="f",
            endpoint=None,
            completion_window=None,
            metadata=None,
            extra={field.name: samples[field.type]},
        )
        body = _body(request)
        if field.in_metadata:
            assert body["metadata"][field.name] == samples[field.type]
            assert field.name not in body
        else:
            assert body[field.name] == samples[field.type]
        wrong = 12345 if field.type != "integer" else "x"
        with pytest.raises(InvalidInputError, match=field.name):
            core.create_batch(
                input_file_id="f",
                endpoint=None,
                completion_window=None,
                metadata=None,
                extra={field.name: wrong},
            )


def test_dashscope_ds_name_limit_applies_via_extra() -> None:
    core = _core(REGISTRY["dashscope"])
    with pytest.raises(InvalidInputError, match="at most 100"):
        core.create_batch(
            input_file_id="f",
            endpoint=None,
            completion_window=None,
            metadata=None,
            extra={"ds_name": "n" * 101},
        )


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_ids_must_be_non_empty(bad: Any) -> None:
    core = _core(REGISTRY["openai"])
    with pytest.raises(InvalidInputError):
        core.get_batch(bad)
    with pytest.raises(InvalidInputError):
        core.create_batch(input_file_id=bad, endpoint=None, completion_window=None, metadata=None, extra=None)


def test_ids_are_path_quoted() -> None:
    assert _core(REGISTRY["openai"]).get_file("a/b c").path == "/files/a%2Fb%20c"


# -- listing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_batch_filters_from_the_spec(vendor: VendorSpec) -> None:
    core = _core(vendor)
    allowed = sorted(vendor.batch_list.params - {"after", "limit"})
    with pytest.raises(InvalidInputError, match="allowed: " + (", ".join(allowed) or "none")):
        core.batch_pager(None, {"colour": "red"})
    for name in allowed:
        pager = core.batch_pager(5, {name: ["a", "b"]})
        assert pager.params()[name] == "a,b"


def test_file_purpose_is_sent_only_where_accepted() -> None:
    assert _core(REGISTRY["openai"]).file_pager(None, "batch", {}).params() == {"purpose": "batch"}
    assert _core(REGISTRY["moonshot"]).file_pager(10, "batch", {}).params() == {}


@pytest.mark.parametrize("page_size", [0, -1, "10"])
def test_bad_page_size(page_size: Any) -> None:
    with pytest.raises(InvalidInputError, match="page_size"):
        _core(REGISTRY["openai"]).batch_pager(page_size, {})


def test_page_size_is_capped() -> None:
    assert _core(REGISTRY["openai"]).batch_pager(5000, {}).params() == {"limit": "100"}


def _page(ids: list[str], **kw: Any) -> Page[Batch]:
    return Page[Batch].model_validate({"data": [{"id": i, "status": "completed"} for i in ids], **kw})


FULL = ListSpec(params=frozenset({"after", "limit"}))


@pytest.mark.parametrize(
    ("spec", "pages", "expected", "requests"),
    [
        (
            FULL,
            [_page(["a", "b"], has_more=True, last_id="b"), _page(["c"], has_more=False)],
            ["a", "b", "c"],
            2,
        ),
        (FULL, [_page(["a", "b"], has_more=True), _page(["c"])], ["a", "b", "c"], 2),
        (
            FULL,
            [_page(["a"], has_more=True, last_id="a"), _page(["a"], has_more=True, last_id="a")],
            ["a"],
            2,
        ),
        (FULL, [_page(["a", "b"], has_more=True), _page(["a", "b"], has_more=True)], ["a", "b"], 2),
        (FULL, [_page([], has_more=True)], [], 1),
        (FULL, [_page(["a"], has_more=True, last_id=""), _page(["b"])], ["a", "b"], 2),
        (FULL, [_page(["a"])], ["a"], 1),
        (ListSpec(params=frozenset(), has_more=False), [_page(["a", "b"], has_more=True)], ["a", "b"], 1),
    ],
    ids=[
        "has-more",
        "cursor-from-data",
        "stuck-cursor",
        "repeated-page",
        "empty-page",
        "empty-last-id",
        "no-has-more",
        "no-after",
    ],
)
def test_pager_always_ends(
    spec: ListSpec, pages: list[Page[Batch]], expected: list[str], requests: int
) -> None:
    pager = Pager(spec, {}, 2)
    got: list[str] = []
    sent: list[dict[str, str]] = []
    feed = iter(pages)
    while not pager.done:
        sent.append(pager.params())
        got += [b.id for b in pager.feed(next(feed))]
    assert got == expected
    assert len(sent) == requests
    if requests > 1:
        assert sent[1]["after"] in {"a", "b"}


# -- multipart, names, lines ------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["in.jsonl", 'we"ird\\name.jsonl', "名前.jsonl"])
def test_multipart_layout_parses_as_a_form(filename: str) -> None:
    layout = multipart_layout({"purpose": "batch"}, filename=filename, boundary="BOUNDARY")
    content = b'{"a":1}\n{"b":2}\n'
    body = layout.head + content + layout.tail
    assert layout.content_length(len(content)) == len(body)
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {layout.content_type}\r\n\r\n".encode() + body
    )
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["purpose", "file"]
    assert parts[0].get_payload(decode=True) == b"batch"
    assert parts[1].get_payload(decode=True) == content


@pytest.mark.parametrize(
    ("source", "expected"),
    [("/a/b/in.jsonl", "in.jsonl"), ("rel.jsonl", "rel.jsonl"), (object(), "input.jsonl")],
)
def test_source_name(source: Any, expected: str) -> None:
    assert source_name(source) == expected


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"a\nb\n"], [b"a", b"b"]),
        ([b"a", b"\nb", b"\n"], [b"a", b"b"]),
        ([b"a\r\n\r\nb"], [b"a", b"b"]),
        ([b"", b"x"], [b"x"]),
        ([b"\n\n"], []),
        ([b'{"k": 1}\n{"k"', b": 2}"], [b'{"k": 1}', b'{"k": 2}']),
    ],
)
def test_line_splitter(chunks: list[bytes], lines: list[bytes]) -> None:
    splitter = LineSplitter()
    got = [line for chunk in chunks for line in splitter.feed(chunk)] + splitter.flush()
    assert got == lines
