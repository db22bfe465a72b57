"""
Both faces go through the proxy the environment names, shown with a real forward proxy on loopback.

``HTTP_PROXY``/``HTTPS_PROXY`` by scheme, then ``ALL_PROXY``; ``NO_PROXY`` exempts hosts; credentials in
the proxy URL become ``Proxy-Authorization``; SOCKS is refused. The sync face reads the environment when
its client is made, the async face when its loop's shared session is: every call here runs on a fresh
hook (and, on the async face, a fresh event loop).
"""

from __future__ import annotations

import base64
import gc
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hookmock import FACES, batch_json, get_batch_on
from loopback import ForwardProxy, Received, Vendor, response, self_signed, server_context

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.testing import request_lines
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

CREDENTIALS = "proxy-user:pa ss@word"


@pytest.fixture
def proxy() -> Iterator[Callable[..., ForwardProxy]]:
    started: list[ForwardProxy] = []

    def start(credentials: str | None = None) -> ForwardProxy:
        server = ForwardProxy(credentials).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def proxy_url(server: ForwardProxy, credentials: str | None = None) -> str:
    if credentials is None:
        return server.origin
    user, _, password = credentials.partition(":")
    quoted = "".join(c if c.isalnum() or c == "-" else f"%{ord(c):02X}" for c in password)
    return f"http://{user}:{quoted}@127.0.0.1:{server.port}"


@pytest.fixture
def emulated_batch(emulator: Emulator, emulator_hook: Callable[..., BatchHook], tmp_path: Path) -> str:
    """Make a batch on the emulator (directly, before any proxy is set); return its id."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(request_lines(REGISTRY["openai"], ["r1"]))
    hook = emulator_hook("openai")
    return hook.create_batch(input_file_id=hook.upload_file(source).id).id


@pytest.fixture
def tls_vendor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vendor_server: Callable[..., Vendor]
) -> Vendor:
    """A vendor over TLS on loopback whose self-signed certificate SSL_CERT_FILE trusts."""
    cert_file, key_file = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))

    def answer(request: Received) -> bytes:
        return response(200, json.dumps(batch_json(request.path.rsplit("/", 1)[-1])).encode())

    return vendor_server(answer, context=server_context(cert_file, key_file))


@pytest.fixture
def tls_hook(
    tls_vendor: Vendor, connect: Callable[..., str], hooks: Callable[[BatchHook], BatchHook]
) -> BatchHook:
    return hooks(BatchHook(connect(host=tls_vendor.origin + "/v1", extra={"max_retries": 0})))


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
def test_plain_http_goes_through_the_proxy(
    face: str,
    variable: str,
    emulated_batch: str,
    emulator: Emulator,
    emulator_hook: Callable[..., BatchHook],
    proxy: Callable[..., ForwardProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = proxy()
    monkeypatch.setenv(variable, server.origin)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # for https:// only: never used here
    assert get_batch_on(face, emulator_hook("openai"), emulated_batch).id == emulated_batch
    [seen] = server.seen
    assert (seen.method, seen.target) == ("GET", f"{emulator.base_url('openai')}/batches/{emulated_batch}")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "ALL_PROXY"])
def test_https_is_tunnelled_through_the_proxy(
    face: str,
    variable: str,
    tls_vendor: Vendor,
    tls_hook: BatchHook,
    proxy: Callable[..., ForwardProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = proxy()
    monkeypatch.setenv(variable, server.origin)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # for http:// only: never used here
    assert get_batch_on(face, tls_hook, "b1").id == "b1"
    assert [(s.method, s.target) for s in server.seen] == [("CONNECT", f"127.0.0.1:{tls_vendor.port}")]
    assert [r.path for r in tls_vendor.requests] == ["/v1/batches/b1"]


@pytest.mark.parametrize("face", FACES)
def test_no_proxy_exempts_the_host(
    face: str,
    emulated_batch: str,
    emulator_hook: Callable[..., BatchHook],
    proxy: Callable[..., ForwardProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = proxy()
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(variable, server.origin)
    monkeypatch.setenv("NO_PROXY", "example.invalid,127.0.0.1")
    assert get_batch_on(face, emulator_hook("openai"), emulated_batch).id == emulated_batch
    assert server.seen == []


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_credentials_are_sent_as_proxy_authorization(
    face: str,
    scheme: str,
    emulated_batch: str,
    emulator_hook: Callable[..., BatchHook],
    tls_hook: BatchHook,
    proxy: Callable[..., ForwardProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = proxy(credentials=CREDENTIALS)
    monkeypatch.setenv("ALL_PROXY", proxy_url(server, CREDENTIALS))
    hook, batch_id = (emulator_hook("openai"), emulated_batch) if scheme == "http" else (tls_hook, "b1")
    # The proxy answers 407 without the right header, so the call succeeding is the proof.
    assert get_batch_on(face, hook, batch_id).id == batch_id
    expected = "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()
    assert [s.headers.get("proxy-authorization") for s in server.seen] == [expected]
    assert [s.method for s in server.seen] == ["GET" if scheme == "http" else "CONNECT"]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("variable", ["ALL_PROXY", "HTTP_PROXY"])
def test_socks_proxies_are_refused(
    face: str, variable: str, emulator_hook: Callable[..., BatchHook], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, "socks5://127.0.0.1:1080")
    gc.collect()  # what earlier tests left behind is not this test's to report
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(InvalidInputError, match="SOCKS proxies are not supported"):
            get_batch_on(face, emulator_hook("openai"), "batch_1")
        gc.collect()
    # Refused before anything was opened: no session (or client) left unclosed.
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
