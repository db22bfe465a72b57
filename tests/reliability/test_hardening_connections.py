"""
Hardening, connections: whatever an Airflow connection holds is checked once, the same way on both faces.

Each property reads a real Airflow connection (an ``AIRFLOW_CONN_*`` variable, one per generated example)
through the sync face (``get_batch``), the async face (``aget_batch`` under ``asyncio.run``) and the UI's
test path (``test_connection``), against a scripted vendor on loopback that records what arrives. The
field-by-field messages are pinned in ``tests/hooks/test_settings.py``; here the claims are end to end:
a connection works, sending exactly what it says, or it is refused with one typed error, the same on
every path, before a byte is sent. No name is ever looked up in DNS: any host but 127.0.0.1 fails its
look-up, which is recorded, so an accepted foreign host shows where each face would have gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from relkit import VENDORS, connection, examples, shown

from airflow_provider_llmbatch.exceptions import APIConnectionError, APITimeoutError, InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.errors import secret_forms
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.retry import NO_RETRY
from airflow_provider_llmbatch.vendors import REGISTRY
from tests.hooks.loopback import Received, Vendor, response, serving

pytestmark = pytest.mark.integration

KEY = "sk-hardening-0123456789abcdef"
PATHS = ("sync", "async", "test_connection")
"""The three ways a connection is read: a worker's call, a trigger's call, the UI's Test button."""


def _answer(data: Any) -> bytes:
    return response(200, json.dumps(data).encode(), "Content-Type: application/json")


def _batch(batch_id: str, status: str = "in_progress", **fields: Any) -> dict[str, Any]:
    return {"id": batch_id, "object": "batch", "status": status, "created_at": 1_800_000_000, **fields}


def mini_vendor(request: Received) -> bytes:
    """Answer every call the hook makes; batch listings come in two pages of one."""
    path = re.sub(r"^.*?/(batches|files)", r"/\1", request.path)
    if path == "/batches" and request.method == "GET":
        after = request.query.get("after")
        page = [_batch("b2" if after else "b1")]
        return _answer({"object": "list", "data": page, "has_more": not after, "last_id": page[0]["id"]})
    if path == "/batches":
        metadata = json.loads(request.body)["metadata"]
        return _answer(_batch("b-new", input_file_id="f1", metadata=metadata))
    if path.startswith("/batches/"):
        return _answer(
            _batch(path.split("/")[2], "cancelling" if path.endswith("/cancel") else "in_progress")
        )
    if path == "/files" and request.method == "GET":
        return _answer({"object": "list", "data": [_file()], "has_more": False})
    if path == "/files/f1/content":
        return response(200, b'{"custom_id": "r1"}\n')
    if path == "/files/f1" and request.method == "DELETE":
        return _answer({"id": "f1", "object": "file", "deleted": True})
    return _answer(_file())


def _file() -> dict[str, Any]:
    return {"id": "f1", "object": "file", "bytes": 19, "filename": "in.jsonl", "purpose": "batch"}


@pytest.fixture
def vendor() -> Iterator[Vendor]:
    with serving(mini_vendor) as server:
        yield server


class Lookups:
    """Name look-ups, refused for every host but 127.0.0.1 and recorded: no test ever reaches the network."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []
        self._real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name == "127.0.0.1":
            return self._real(host, port, *args, **kwargs)
        self.asked.append((name.lower(), int(port)))
        raise socket.gaierror(socket.EAI_NONAME, "no look-ups in this test")


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Lookups:
    guard = Lookups()
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return guard


async def _aget(hook: BatchHook, batch_id: str) -> Batch:
    try:
        return await hook.aget_batch(batch_id)
    finally:
        await hook.aclose()


def read_three_ways(conn_id: str) -> dict[str, Any]:
    """Return what each path made of the connection: a batch, ``test_connection``'s pair, or the error."""
    outcomes: dict[str, Any] = {}
    for path in PATHS:
        hook = BatchHook(conn_id, retry_policy=NO_RETRY)
        try:
            if path == "sync":
                outcomes[path] = hook.get_batch("b1")
            elif path == "async":
                outcomes[path] = asyncio.run(_aget(hook, "b1"))
            else:
                outcomes[path] = hook.test_connection()
        except Exception as exc:
            outcomes[path] = exc
        finally:
            hook.close()
    return outcomes


def refusal(outcomes: dict[str, Any]) -> str | None:
    """Return the one refusal message of all three paths, or None; fail if the paths disagree."""
    sync, async_, tested = outcomes["sync"], outcomes["async"], outcomes["test_connection"]
    refused = [isinstance(sync, InvalidInputError), isinstance(async_, InvalidInputError)]
    assert refused[0] == refused[1], f"the faces disagree: {sync!r} / {async_!r}"
    if not refused[0]:
        return None
    assert str(sync) == str(async_), "one check, one message, whichever face reads the connection"
    assert tested == (False, str(sync)), "the UI's test path says the same"
    return str(sync)


# -- classes 1 and 2: the key, stripped or refused unseen --------------------------------------------------

WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
NOT_PRINTABLE = st.characters(
    exclude_categories=["Cs"], exclude_characters=[chr(c) for c in range(0x21, 0x7F)]
)
NOTABLE = ["\n", "\r", "\t", " ", "\x00", "\x7f", "\x1b", "\u200b", "\ufeff", "\u00e9", "\u3000", "\u2028"]


@st.composite
def keys(draw: st.DrawFn) -> str:
    """A key as pasted: printable ASCII (up to 400), with whitespace and other characters around and in it."""
    body = "sk-" + draw(st.text(PRINTABLE, min_size=12, max_size=400))
    noise = st.text(NOT_PRINTABLE | st.sampled_from(NOTABLE), min_size=1, max_size=3)
    if draw(st.booleans()):
        at = draw(st.integers(3, len(body) - 1))
        body = body[:at] + draw(noise) + body[at:]
    around = st.text(st.sampled_from(WHITESPACE), max_size=3)
    return draw(around) + draw(noise if draw(st.integers(0, 4)) == 0 else st.just("")) + body + draw(around)


def _unsendable_at(stripped: str) -> int | None:
    return next((i for i, c in enumerate(stripped, start=1) if not "!" <= c <= "~"), None)


@examples(150)
@given(key=keys())
def test_a_key_is_stripped_or_refused_unseen_on_every_path(key: str, vendor: Vendor) -> None:
    stripped = key.strip()
    position = _unsendable_at(stripped)
    before = len(vendor.requests)
    with connection({"conn_type": "llmbatch_openai", "host": vendor.origin + "/v1", "password": key}) as conn:
        outcomes = read_three_ways(conn)
    sent = vendor.requests[before:]
    message = refusal(outcomes)
    event("stripped, works" if stripped and position is None else "refused")
    if stripped and position is None:
        # Surrounding whitespace (whatever str.isspace says, a secret file's newline included) is dropped.
        assert message is None, message
        assert isinstance(outcomes["sync"], Batch)
        assert isinstance(outcomes["async"], Batch)
        assert outcomes["test_connection"][0] is True
        assert [r.headers["authorization"] for r in sent] == [f"Bearer {stripped}"] * 3
        return
    assert message is not None, "a key no header can carry as it is must be refused"
    assert sent == [], "refused before anything was sent"
    if not stripped:
        assert "password: expected the OpenAI-compatible API key, got nothing" in message
    else:
        kind = "a non-ASCII" if ord(stripped[position - 1]) > 0x7E else "a control or space"
        assert message.endswith(
            f"password (API key): expected printable ASCII only, got {kind} character at position {position}"
        )
    # Never the key, in any form, nor any long piece of it.
    pieces = [p for p in re.split(r"[^!-~]+", key) if len(p) >= 12]
    for exc in (outcomes["sync"], outcomes["async"]):
        for where, text in shown(exc).items():
            for secret in {*secret_forms(key), *(secret_forms(stripped) if stripped else []), *pieces}:
                assert secret not in text, f"a form of the key is in the {where}"


# -- class 11: every connection field, one check, the same on every path ----------------------------------

JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 10**400, 2**63, 0.0005, 86400, 86401, 100, 101, 1.5])
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["nan", "inf", "-inf", "1e400", "5", " 7 ", "0.001", "abc", "", "default", "intl"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=3,
)
HOSTILE_HOSTS = [
    "",
    "   ",
    "ftp://h.invalid/v1",
    "https://me:hunter22@h.invalid/v1",
    "https://h.invalid/v1#frag",
    "http:///v1",
    "https://[::1/v1",
    "https://a..b/v1",
    "https://xn--/v1",
    "https://\uff21.invalid/v1",
    "https://" + "a" * 64 + ".invalid/v1",
    "https://h.invalid/v 1",
    "https://h.invalid\n/v1",
    "https://h\u2028x.invalid/v1",
    "https://h.invalid:99999/v1",
    "https://h.invalid:0/v1",
    "https://h.invalid:abc/v1",
    "h.invalid/v1",
    "https://b\u00fccher.invalid/v1",
    "https://h.invalid/v1?a=1&a=2",
    "https://h.invalid/v1?a=%E9",
]
FIELD = re.compile(
    r"^connection '[\w]+': (connection type|host \(Base URL\)|port|password|password \(API key\)|extra|"
    r"extra '[a-z_]+'): expected "
)


def _no_ip_literal(text: str) -> bool:
    # aiohttp connects to an IP literal without a look-up: only names are safe to generate.
    try:
        host = urlsplit(text if "://" in text else f"https://{text}").hostname or ""
    except ValueError:
        return True  # not a URL at all: refused before any connection
    return not re.fullmatch(r"[\d.:\[\]a-fA-F]*\d[\d.:\[\]a-fA-F]*", host)


MUTATIONS = ["conn_type", "host", "port", "password", "timeout", "max_retries", "region", "header", "extra"]


@st.composite
def connections(draw: st.DrawFn, origin: str) -> dict[str, Any]:
    """A working connection with up to two fields set to anything Airflow stores (text, an int, any JSON)."""
    spec = REGISTRY[draw(st.sampled_from(VENDORS))]
    path = draw(st.sampled_from(["/v1", "/api/v4", ""])) + draw(st.sampled_from(["", "?v=1"]))
    value: dict[str, Any] = {"conn_type": spec.conn_type, "host": origin + path, "password": KEY}
    extra: dict[str, Any] = {}
    for field in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2, unique=True)):
        if field == "conn_type":
            value["conn_type"] = draw(st.sampled_from(["http", "llmbatch_", "", "LLMBATCH_OPENAI"]))
        elif field == "host":
            text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24).filter(_no_ip_literal)
            value["host"] = draw(st.sampled_from(HOSTILE_HOSTS) | text)
        elif field == "port":  # a port counts where the host names none
            value["host"] = draw(st.sampled_from(["h.invalid/v1", "http://h.invalid", ""]))
            value["port"] = draw(st.sampled_from([-3, 0, 65536, 99_999, 2**40]) | st.integers(1, 65535))
        elif field == "password":
            value["password"] = draw(
                st.sampled_from(["", " \n", "sk-a\tb-0123456789", "\u200bsk-0123456789"])
            )
        elif field == "header" and spec.conn_fields:
            name = draw(st.sampled_from([f.name for f in spec.conn_fields]))
            extra[name] = draw(JSONISH | st.sampled_from(["org\r\nX-Evil: 1", "ws 9", " org-1 "]))
        elif field == "region":
            extra["region"] = draw(JSONISH | st.sampled_from(sorted(spec.base_urls)))
            value["host"] = draw(st.sampled_from([value["host"], ""]))  # an empty host takes the region's URL
        elif field == "extra":
            value["extra"] = draw(st.sampled_from([[1], 3, "[]"]))
        elif field in ("timeout", "max_retries"):
            extra[field] = draw(JSONISH | st.sampled_from([5, "30", 2.5, 0, 3]))
    value.setdefault("extra", extra)
    return value


def _timeout_of(value: dict[str, Any]) -> float:
    extra = value["extra"] if isinstance(value["extra"], dict) else {}
    try:
        return float(extra.get("timeout") or 60)
    except (TypeError, ValueError, OverflowError):
        return 60.0


@examples(200)
@given(data=st.data())
def test_every_connection_field_is_checked_once_the_same_on_every_path(
    data: st.DataObject, vendor: Vendor, lookups: Lookups
) -> None:
    value = data.draw(connections(vendor.origin))
    before, asked_before = len(vendor.requests), len(lookups.asked)
    with connection(value) as conn:
        outcomes = read_three_ways(conn)
    sent, asked = vendor.requests[before:], lookups.asked[asked_before:]
    message = refusal(outcomes)
    if message is not None:
        match = FIELD.match(message)
        assert match, f"names the field and what it expects: {message}"
        event(f"refused: {match.group(1)}")
        assert KEY not in message
        assert (sent, asked) == ([], []), "refused before anything was sent or even looked up"
        return
    sync, async_ = outcomes["sync"], outcomes["async"]
    event("accepted: " + ("a host elsewhere" if asked else "loopback"))
    if asked:
        # A host elsewhere: both faces went for the same host and port, and nothing could have been sent.
        assert sent == []
        for exc in (sync, async_):
            assert isinstance(exc, APIConnectionError), repr(exc)
            assert exc.effect == "not_sent", repr(exc)
        assert len(set(asked)) == 1, f"the faces looked up different hosts: {asked}"
        assert outcomes["test_connection"][0] is False
        return
    if _timeout_of(value) < 1 and any(isinstance(o, APITimeoutError) for o in (sync, async_)):
        return  # a timeout of milliseconds may run out on loopback: accepted, and honoured
    assert isinstance(sync, Batch), repr(sync)
    assert isinstance(async_, Batch), repr(async_)
    assert outcomes["test_connection"][0] is True
    first, second = sent[0], sent[1]
    assert (first.method, first.path, first.query) == (second.method, second.path, second.query)
    for name in ("authorization", "openai-organization", "openai-project", "x-dashscope-workspace"):
        assert first.headers.get(name) == second.headers.get(name), name


# -- class 10: the base URL's query string, on every call of both faces ----------------------------------

QUERY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=8)
RAW_QUERIES = ["a=%zz", "a=1;b=2", "=x&y", "a&b=", "k=%C3%A9", "k=\u00e9", "x=a+b", "x=%2B", "x=%26%3D%23"]


@st.composite
def base_queries(draw: st.DrawFn) -> str:
    """A query string as a user writes it: generated names and values, percent-encoded, or raw oddities."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(RAW_QUERIES))
    params = draw(st.dictionaries(QUERY_TEXT, st.text(max_size=8), min_size=1, max_size=4))
    return urlencode(params, quote_via=quote)


EVERY_SYNC_CALL: list[Callable[[BatchHook, Path], Any]] = [
    lambda h, tmp: h.get_batch("b1"),
    lambda h, tmp: list(h.list_batches(page_size=1)),  # two pages: the second with after=b1
    lambda h, tmp: h.cancel_batch("b1"),
    lambda h, tmp: h.upload_file(tmp / "in.jsonl"),
    lambda h, tmp: h.create_batch(input_file_id="f1"),
    lambda h, tmp: h.get_file("f1"),
    lambda h, tmp: list(h.list_files()),
    lambda h, tmp: h.download_file("f1", tmp / "out.jsonl"),
    lambda h, tmp: h.delete_file("f1"),
    lambda h, tmp: h.test_connection(),
]
"""Every sync call of the hook, by its one request each (the listing of batches: two)."""


async def _async_calls(hook: BatchHook) -> None:
    try:
        await hook.aget_batch("b1")
        await hook.acancel_batch("b1")
    finally:
        await hook.aclose()


def _own_params(request: Received) -> set[str]:
    """Return the query names a call sets itself (a listing's page size and cursor)."""
    return (
        {"limit", "after"}
        if request.method == "GET" and request.path.endswith(("/batches", "/files"))
        else set()
    )


@examples(60)
@given(query=base_queries())
def test_the_base_url_query_goes_with_every_call_on_both_faces(
    query: str, vendor: Vendor, tmp_path_factory: pytest.TempPathFactory
) -> None:
    value = {"conn_type": "llmbatch_openai", "host": f"{vendor.origin}/v1?{query}", "password": KEY}
    before = len(vendor.requests)
    with connection(value) as conn:
        hook = BatchHook(conn, retry_policy=NO_RETRY)
        refused: InvalidInputError | None = None
        try:
            expected = dict(hook._core().settings.params)
        except InvalidInputError as exc:
            refused = exc
        event("refused" if refused is not None else "accepted")
        if refused is not None:
            assert "host (Base URL)" in str(refused)
            assert vendor.requests[before:] == []
            return
        tmp = tmp_path_factory.mktemp("query")
        (tmp / "in.jsonl").write_bytes(b'{"custom_id": "r1"}\n')
        with hook:
            for call in EVERY_SYNC_CALL:
                call(hook, tmp)
        sync_sent = vendor.requests[before:]
        asyncio.run(_async_calls(BatchHook(conn, retry_policy=NO_RETRY)))
        async_sent = vendor.requests[before + len(sync_sent) :]
    assert len(sync_sent) == 11
    assert len(async_sent) == 2
    for request in sync_sent + async_sent:
        got = {k: v for k, v in request.query.items() if k not in _own_params(request)}
        assert got == {k: [v] for k, v in expected.items() if k not in _own_params(request)}, request.target
    # The async face sends the poll and the cancel exactly as the sync face does.
    by_face = [
        [(r.method, r.path, r.query) for r in sent if "/batches/b1" in r.path]
        for sent in (sync_sent, async_sent)
    ]
    assert by_face[0] == by_face[1]


@pytest.mark.parametrize("query", ["a=1&a=2", "v=%FF"])
def test_a_query_the_faces_cannot_send_as_written_is_refused(query: str, vendor: Vendor) -> None:
    value = {"conn_type": "llmbatch_openai", "host": f"{vendor.origin}/v1?{query}", "password": KEY}
    with connection(value) as conn:
        message = refusal(read_three_ways(conn))
    assert message is not None
    assert "host (Base URL): expected" in message
    assert vendor.requests == []
