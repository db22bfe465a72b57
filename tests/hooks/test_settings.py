"""Connection fields, checked once (``settings_from_connection``); proxies from the environment."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.settings import ConnSettings, proxy_for, settings_from_connection
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

KEY = "sk-settings-test-key-0123456789"
VENDORS = list(REGISTRY.values())


def read(
    conn_type: str = "llmbatch_openai",
    *,
    host: Any = "",
    password: Any = KEY,
    extra: Any = None,
    port: Any = None,
    timeout: Any = None,
    conn_id: str = "c1",
) -> ConnSettings:
    return settings_from_connection(
        conn_id,
        conn_type=conn_type,
        host=host,
        password=password,
        extra={} if extra is None else extra,
        port=port,
        timeout=timeout,
    )


# -- what is accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "extra", "expected", "params"),
    [
        ("https://api.example.com/v1/", None, {}, "https://api.example.com/v1", {}),
        ("  api.example.com/v1\n", None, {}, "https://api.example.com/v1", {}),
        ("api.example.com", 8443, {}, "https://api.example.com:8443", {}),
        ("api.example.com", "8443", {}, "https://api.example.com:8443", {}),
        ("http://127.0.0.1:8000/openai/v1", 9999, {}, "http://127.0.0.1:8000/openai/v1", {}),
        ("https://h/v1?api-version=1", None, {}, "https://h/v1", {"api-version": "1"}),
        ("https://h/v1/?api-version=1&flag=", None, {}, "https://h/v1", {"api-version": "1", "flag": ""}),
        ("", None, {}, "https://dashscope.aliyuncs.com/compatible-mode/v1", {}),
        (
            None,
            None,
            {"region": "ap-singapore"},
            "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
            {},
        ),
        ("  ", None, {"region": "cn-beijing"}, "https://dashscope.aliyuncs.com/compatible-mode/v1", {}),
    ],
)
def test_base_url_and_its_query(
    host: str | None, port: Any, extra: dict[str, Any], expected: str, params: dict[str, str]
) -> None:
    got = read("llmbatch_dashscope", host=host, extra=extra, port=port)
    assert (got.base_url, dict(got.params)) == (expected, params)


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_every_region_of_every_vendor(vendor: VendorSpec) -> None:
    for region, url in vendor.base_urls.items():
        got = read(vendor.conn_type, extra={"region": region})
        assert got.base_url == url.rstrip("/")
        assert got.vendor is vendor


@pytest.mark.parametrize(
    ("extra", "override", "timeout", "retries"),
    [
        ({}, None, 60.0, 5),
        ({"timeout": 5, "max_retries": 0}, None, 5.0, 0),
        ({"timeout": "2.5", "max_retries": "3"}, None, 2.5, 3),
        ({"timeout": 0.001, "max_retries": 100}, None, 0.001, 100),
        ({"timeout": 86400, "max_retries": 3.0}, None, 86400.0, 3),
        ({"timeout": 5}, 9.0, 9.0, 5),
        ({"timeout": "", "max_retries": None}, None, 60.0, 5),
    ],
)
def test_timeout_and_retries(
    extra: dict[str, Any], override: float | None, timeout: float, retries: int
) -> None:
    got = read(extra=extra, timeout=override)
    assert (got.timeout, got.max_retries) == (timeout, retries)


def test_vendor_header_fields_and_the_key_stay_out_of_repr() -> None:
    got = read(extra={"organization": " org-1 ", "project": "", "unrelated": "x"})
    assert got.headers == {"OpenAI-Organization": "org-1"}
    headers = got.request_headers()
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["OpenAI-Organization"] == "org-1"
    assert KEY not in repr(got)
    workspace = read("llmbatch_dashscope", extra={"workspace": "ws 9"})  # not secret: a space is fine
    assert workspace.request_headers()["X-DashScope-WorkSpace"] == "ws 9"


def test_origin_is_the_shared_session_key() -> None:
    assert read(host="http://127.0.0.1:8000/openai/v1?x=1").origin == "http://127.0.0.1:8000"


# -- what is refused, and how it is said ------------------------------------------------------------------


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("timeout nan", {"extra": {"timeout": "nan"}}, "extra 'timeout': expected a number from 0.001 to 86400"),
    ("timeout inf", {"extra": {"timeout": "inf"}}, "extra 'timeout'"),
    ("timeout -1", {"extra": {"timeout": -1}}, "extra 'timeout'.*got -1"),
    ("timeout 0", {"extra": {"timeout": 0}}, "extra 'timeout'.*got 0"),
    ("timeout over a day", {"extra": {"timeout": 86401}}, "extra 'timeout'"),
    ("timeout abc", {"extra": {"timeout": "abc"}}, "extra 'timeout'.*got 'abc'"),
    ("timeout True", {"extra": {"timeout": True}}, "extra 'timeout'.*got bool"),
    ("timeout list", {"extra": {"timeout": [5]}}, "extra 'timeout'.*got list"),
    ("timeout argument nan", {"timeout": float("nan")}, "extra 'timeout'"),
    ("max_retries 1.5", {"extra": {"max_retries": 1.5}}, "extra 'max_retries': expected a whole number"),
    ("max_retries -1", {"extra": {"max_retries": -1}}, "extra 'max_retries'.*from 0 to 100"),
    ("max_retries 101", {"extra": {"max_retries": 101}}, "extra 'max_retries'"),
    ("max_retries x", {"extra": {"max_retries": "x"}}, "extra 'max_retries'.*got 'x'"),
    ("max_retries True", {"extra": {"max_retries": True}}, "extra 'max_retries'.*got bool"),
    ("port 0", {"host": "h.example", "port": 0}, "port: expected a whole number from 1 to 65535, got 0"),
    ("port 99999", {"host": "h.example", "port": 99999}, "port.*got 99999"),
    ("port x", {"host": "h.example", "port": "x"}, "port.*got 'x'"),
    ("port -1", {"host": "h.example", "port": "-1"}, "port.*got '-1'"),
    ("port True", {"host": "h.example", "port": True}, "port.*got True"),
    ("port in host too large", {"host": "http://h:99999/v1"}, r"host \(Base URL\): expected a valid http"),
    (
        "region list",
        {"extra": {"region": ["intl"]}},
        r"extra 'region': expected one of default, got \['intl'\]",
    ),
    ("region unknown", {"extra": {"region": "eu"}}, "extra 'region': expected one of default, got 'eu'"),
    ("user:pass in host", {"host": "https://me:hunter22@h/v1"}, "no user or password in the URL"),
    ("user in host", {"host": "https://me@h/v1"}, "no user or password"),
    ("fragment", {"host": "https://h/v1#top"}, "no #fragment"),
    ("ftp", {"host": "ftp://h/v1"}, r"an http:// or https:// URL"),
    ("no host name", {"host": "http:///v1"}, "with a host name"),
    ("broken IPv6", {"host": "http://[::1/v1"}, "a valid http"),
    ("space in host", {"host": "https://h/v 1"}, "without spaces or control characters, got .* position 12"),
    ("newline in host", {"host": "https://h/\nv1"}, "position 11"),
    ("NUL in host", {"host": "https://h\x00/v1"}, "position 10"),
    ("host not text", {"host": 8080}, r"host \(Base URL\): expected a URL, got int"),
    ("extra not a mapping", {"extra": ["timeout"]}, "extra: expected a JSON object, got list"),
    ("no key", {"password": None}, "password: expected the OpenAI-compatible API key, got nothing"),
    ("empty key", {"password": " \n"}, "password: expected the OpenAI-compatible API key"),
    ("foreign type", {"conn_type": "http"}, "connection type: expected one of llmbatch_dashscope"),
    (
        "header not text",
        {"extra": {"organization": ["org"]}},
        "extra 'organization': expected text, got list",
    ),
    (
        "control in a header",
        {"extra": {"organization": "org\r\nX-Evil: 1"}},
        "extra 'organization'.*position 4",
    ),
]


@pytest.mark.parametrize(("kwargs", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_bad_fields_are_refused_naming_the_field(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as info:
        read(conn_id="my_conn", **kwargs)
    assert str(info.value).startswith("connection 'my_conn': ")
    assert "hunter22" not in str(info.value)


# -- the key: stripped, or refused without ever being shown ----------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
KEYS = st.text(PRINTABLE, min_size=12, max_size=60).map(lambda body: "sk-" + body)
BAD_CHARS = ["\n", "\r", "\t", " ", "\x00", "\x7f", "\x1b", "\u200b", "\u00e9", "\u3000", "\ufeff"]


@settings(max_examples=60, deadline=None)
@given(key=KEYS, before=st.text(" \t\r\n", max_size=3), after=st.text(" \t\r\n", max_size=3))
def test_surrounding_whitespace_is_stripped_from_the_key(key: str, before: str, after: str) -> None:
    assert read(password=before + key + after).request_headers()["Authorization"] == f"Bearer {key}"


def _assert_never_shown(exc: BaseException, key: str) -> None:
    revived = pickle.loads(pickle.dumps(exc))
    for text in (str(exc), repr(exc), str(revived), repr(revived)):
        assert key not in text
        assert key.strip() not in text
    assert key.encode() not in pickle.dumps(exc)


@settings(max_examples=150, deadline=None)
@given(head=KEYS, bad=st.sampled_from(BAD_CHARS), tail=st.text(PRINTABLE, min_size=1, max_size=20))
def test_keys_with_inner_control_space_or_non_ascii_are_refused_unseen(
    head: str, bad: str, tail: str
) -> None:
    key = head + bad + tail
    with pytest.raises(
        InvalidInputError, match=r"password \(API key\): expected printable ASCII only"
    ) as info:
        read(password=key)
    assert f"at position {len(head) + 1}" in str(info.value)
    _assert_never_shown(info.value, key)


@settings(max_examples=60, deadline=None)
@given(key=KEYS, bad=st.sampled_from(["\x00", "\x7f", "\u200b", "\u00e9", "\ufeff"]), at_end=st.booleans())
def test_invisible_characters_at_the_ends_are_not_whitespace(key: str, bad: str, at_end: bool) -> None:
    # A zero-width space or a BOM pasted with the key is no whitespace: refused, not stripped.
    wrapped = key + bad if at_end else bad + key
    with pytest.raises(InvalidInputError, match="printable ASCII only") as info:
        read(password=wrapped)
    _assert_never_shown(info.value, wrapped)


@pytest.mark.parametrize("bad", BAD_CHARS[:2] + BAD_CHARS[4:7])
def test_secret_headers_are_checked_like_the_key(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from airflow_provider_llmbatch.hooks import settings as settings_module

    spec = REGISTRY["openai"]
    secret_fields = tuple(replace(f, secret=True) for f in spec.conn_fields)
    monkeypatch.setitem(
        settings_module._BY_CONN_TYPE, "llmbatch_openai", replace(spec, conn_fields=secret_fields)
    )
    value = "org-secret-1234" + bad + "5678"
    with pytest.raises(InvalidInputError, match="extra 'organization'") as info:
        read(extra={"organization": value})
    _assert_never_shown(info.value, value)
    with pytest.raises(InvalidInputError, match="extra 'organization'"):
        read(extra={"organization": "org secret"})  # a secret never holds a space


# -- proxies from the environment ------------------------------------------------------------------------

HTTPS_ORIGIN = "https://api.vendor.test"
HTTP_ORIGIN = "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("environment", "url", "expected"),
    [
        ({}, HTTPS_ORIGIN, None),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, HTTPS_ORIGIN, "http://proxy.corp:3128"),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, HTTP_ORIGIN, None),
        ({"HTTP_PROXY": "http://p:1"}, HTTP_ORIGIN, "http://p:1"),
        ({"http_proxy": "p:1"}, HTTP_ORIGIN, "http://p:1"),
        ({"ALL_PROXY": "https://p:1"}, HTTPS_ORIGIN, "https://p:1"),
        ({"ALL_PROXY": "http://all:1", "HTTPS_PROXY": "http://https:1"}, HTTPS_ORIGIN, "http://https:1"),
        ({"ALL_PROXY": "http://all:1", "HTTPS_PROXY": "http://https:1"}, HTTP_ORIGIN, "http://all:1"),
        ({"HTTPS_PROXY": "http://u:p@p:1"}, HTTPS_ORIGIN, "http://u:p@p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "api.vendor.test"}, HTTPS_ORIGIN, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".vendor.test"}, HTTPS_ORIGIN, None),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.test"}, HTTPS_ORIGIN, "http://p:1"),
        ({"ALL_PROXY": "http://p:1", "no_proxy": "127.0.0.1"}, HTTP_ORIGIN, None),
        ({"ALL_PROXY": "http://p:1", "NO_PROXY": "*"}, HTTP_ORIGIN, None),
    ],
)
def test_proxy_for(
    environment: dict[str, str], url: str, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert proxy_for(url) == expected


@pytest.mark.parametrize("proxy", ["socks5://p:1080", "socks5h://p:1080", "ftp://p:21"])
def test_proxies_other_than_http_are_refused(proxy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", proxy)
    with pytest.raises(InvalidInputError, match="SOCKS proxies are not supported"):
        proxy_for(HTTPS_ORIGIN)
