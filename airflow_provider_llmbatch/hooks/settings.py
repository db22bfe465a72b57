"""
What the hook reads from an Airflow connection, checked once, and the transport settings both faces share.

:func:`settings_from_connection` turns a connection into :class:`ConnSettings` and refuses anything the
HTTP layer could not send or would send differently than the user meant, with an
:class:`~airflow_provider_llmbatch.exceptions.InvalidInputError` that names the field and what is
allowed, never a secret's value. :func:`proxy_for` and :func:`ssl_context` are the one reading of the
environment's proxies and CA files, used by the sync face (httpx) and the async face (aiohttp) alike.
"""

from __future__ import annotations

import ipaddress
import math
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import httpx
import yarl

from airflow_provider_llmbatch import __version__
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 5
MAX_TIMEOUT = 24 * 3600.0
"""The longest ``timeout`` accepted: a day per call is already far past any vendor's patience."""
MAX_RETRIES = 100
MAX_CONNECTIONS = 100
"""Connections one client opens at most per origin, on either face: the polls it can have in flight."""

USER_AGENT = f"airflow-provider-llmbatch/{__version__}"

_BY_CONN_TYPE: Mapping[str, VendorSpec] = {spec.conn_type: spec for spec in REGISTRY.values()}


@dataclass(frozen=True)
class ConnSettings:
    """
    What the hook needs from an Airflow connection, checked.

    :param conn_id: the connection id.
    :param vendor: the vendor spec decided by the connection type.
    :param base_url: the API base URL, without a trailing slash, query or fragment.
    :param api_key: the API key (never in ``repr``).
    :param timeout: seconds a whole call may take (a stream's reads and writes get it each).
    :param max_retries: retries of a failed call that is safe to repeat.
    :param params: query parameters the base URL carried, sent with every call.
    :param headers: vendor headers from connection fields (never in ``repr``).
    """

    conn_id: str
    vendor: VendorSpec
    base_url: str
    api_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    params: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def origin(self) -> str:
        """Return scheme://host[:port] of the base URL: the key of the shared async client."""
        parts = urlsplit(self.base_url)
        return f"{parts.scheme}://{parts.netloc}"

    def request_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the headers of one request; the key travels per request, never in a shared client."""
        headers = {"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT, **self.headers}
        if extra:
            headers.update(extra)
        return headers

    def secret_values(self) -> list[str]:
        """Return the values to mask in logs: the key and secret vendor headers."""
        secret_headers = {f.header for f in self.vendor.conn_fields if f.secret and f.header}
        return [self.api_key, *(v for k, v in self.headers.items() if k in secret_headers)]


def _refuse(conn_id: str, what: str, expected: str, got: str | None = None) -> InvalidInputError:
    detail = f", got {got}" if got is not None else ""
    return InvalidInputError(f"connection {conn_id!r}: {what}: expected {expected}{detail}")


def _header_safe(conn_id: str, what: str, value: str, *, secret: bool) -> str:
    """Return ``value`` stripped; refuse any character an HTTP header cannot carry as it was meant."""
    value = value.strip()
    for position, char in enumerate(value, start=1):
        if not " " <= char <= "~" or (secret and char == " "):
            kind = "a non-ASCII" if ord(char) > 0x7E else "a control or space"
            # Only the position: the value may be the key itself.
            raise _refuse(conn_id, what, "printable ASCII only", f"{kind} character at position {position}")
    return value


def _number(conn_id: str, name: str, value: Any, *, integer: bool, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _refuse(conn_id, f"extra {name!r}", f"a number from {low:g} to {high:g}", type(value).__name__)
    try:
        number = float(value)
    except (ValueError, OverflowError):  # not a number, or an integer beyond the float range
        raise _refuse(conn_id, f"extra {name!r}", f"a number from {low:g} to {high:g}", repr(value)) from None
    if not math.isfinite(number) or not low <= number <= high or (integer and not number.is_integer()):
        kind = "a whole number" if integer else "a number"
        raise _refuse(conn_id, f"extra {name!r}", f"{kind} from {low:g} to {high:g}", repr(value))
    return number


def _base_url(
    conn_id: str, vendor: VendorSpec, host: Any, port: Any, region: Any
) -> tuple[str, dict[str, str]]:
    if host is not None and not isinstance(host, str):
        raise _refuse(conn_id, "host (Base URL)", "a URL", type(host).__name__)
    if region not in (None, "") and (not isinstance(region, str) or region not in vendor.base_urls):
        raise _refuse(conn_id, "extra 'region'", f"one of {', '.join(vendor.base_urls)}", repr(region))
    if host and host.strip():
        base_url = host.strip()
        # urlsplit drops tabs and newlines silently and httpx refuses other controls with an untyped
        # error, while aiohttp sends them on: neither is the URL the user meant.
        blank = next((i for i, c in enumerate(base_url, start=1) if c <= " " or c == "\x7f"), None)
        if blank is not None:
            got = f"a space or control character at position {blank}"
            raise _refuse(conn_id, "host (Base URL)", "a URL without spaces or control characters", got)
        if "://" not in base_url:
            base_url = f"https://{base_url}"
    elif region not in (None, ""):
        base_url = vendor.base_urls[region]
    else:
        base_url = vendor.default_base_url
    try:
        parts = urlsplit(base_url)
        if parts.port == 0:
            raise ValueError("Port out of range 1-65535")
    except ValueError as exc:
        raise _refuse(conn_id, "host (Base URL)", "a valid http(s) URL", str(exc)) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _refuse(conn_id, "host (Base URL)", "an http:// or https:// URL with a host name")
    if parts.username is not None or parts.password is not None:
        raise _refuse(conn_id, "host (Base URL)", "no user or password in the URL (the key goes in Password)")
    if parts.fragment:
        raise _refuse(conn_id, "host (Base URL)", "no #fragment")
    if port not in (None, "") and parts.port is None:
        # isdecimal, not isdigit: "²" is a digit that int() refuses.
        if isinstance(port, bool) or not isinstance(port, int | str) or not str(port).isdecimal():
            raise _refuse(conn_id, "port", "a whole number from 1 to 65535", repr(port))
        if not 1 <= int(port) <= 65535:
            raise _refuse(conn_id, "port", "a whole number from 1 to 65535", repr(port))
        parts = parts._replace(netloc=f"{parts.netloc}:{int(port)}")
    base_url = parts._replace(query="", fragment="").geturl().rstrip("/")
    problem = _unsendable_host(base_url)
    if problem is not None:
        raise _refuse(conn_id, "host (Base URL)", "a valid http(s) URL", problem)
    try:
        # Strict: a percent-escape that is not UTF-8 would otherwise be sent as U+FFFD, another value.
        pairs = parse_qsl(parts.query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        what = "a query string of UTF-8 text"
        raise _refuse(conn_id, "host (Base URL)", what, "another encoding") from None
    params = dict(pairs)
    if len(params) < len(pairs):
        # One value per name is what both faces send: a repeated parameter would lose all but its last.
        name = next(n for n in params if sum(1 for k, _ in pairs if k == n) > 1)
        raise _refuse(conn_id, "host (Base URL)", "each query parameter once", f"{name!r} more than once")
    return base_url, params


def _unsendable_host(base_url: str) -> str | None:
    """
    Return why either face could not send to the URL's host, or would send elsewhere; None when both can.

    A host name that parses may still fail when a call is made: an A-label httpx cannot decode
    (``xn--``), an empty or over-long label the resolver's IDNA codec refuses, or a name the two HTTP
    libraries map to different hosts (httpx refuses what aiohttp maps, e.g. full-width letters).
    """
    try:
        sync_url = httpx.URL(base_url)
        sync_url.host  # noqa: B018 - decodes the IDNA name as httpx does on every request
        host = sync_url.raw_host.decode("ascii")
        async_host = yarl.URL(base_url).raw_host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            host.encode("idna")  # as socket.getaddrinfo encodes it
    except (httpx.InvalidURL, ValueError) as exc:  # IDNA errors are UnicodeErrors, so ValueErrors
        return f"a host name that cannot be sent ({exc})"
    if (async_host or "").lower() != host.lower():  # host names and IPv6 addresses ignore case
        return f"a host name the two HTTP clients read differently ({host!r}, {async_host!r})"
    return None


def connection_region(vendor: VendorSpec, host: Any, extra: Any) -> str | None:
    """
    Return the vendor region a connection talks to, read without its secret.

    A Base URL on one of the vendor's own hosts names its region. Any other host (a proxy, the emulator)
    names none: then the ``region`` extra decides, and without it the vendor's default region. None for a
    ``region`` extra the vendor does not have.

    :param vendor: the connection's vendor.
    :param host: the connection's host (Base URL), if any.
    :param extra: the connection's extras.
    """
    if isinstance(host, str) and host.strip():
        found = vendor.region_of(host.strip())
        if found is not None:
            return found
    region = extra.get("region") if isinstance(extra, Mapping) else None
    if region in (None, ""):
        return vendor.default_region
    return region if isinstance(region, str) and region in vendor.base_urls else None


def settings_from_connection(
    conn_id: str,
    *,
    conn_type: str | None,
    host: str | None,
    password: str | None,
    extra: Mapping[str, Any],
    port: int | None = None,
    timeout: float | None = None,
) -> ConnSettings:
    """
    Read and check a connection; the result is what both faces send with.

    :param conn_id: the connection id, for messages.
    :param conn_type: the connection type; decides the vendor.
    :param host: the base URL, with or without scheme; empty for the registry's URL of extra ``region``.
        A query string (``?api-version=1``, each name once) is sent with every call.
    :param password: the API key; surrounding whitespace (a secret file's newline) is stripped.
    :param extra: the connection's extras.
    :param port: the connection's port, used when ``host`` names none.
    :param timeout: a timeout that overrides the connection's.
    :raises InvalidInputError: naming the field and what is allowed (never a secret's value).
    """
    vendor = _BY_CONN_TYPE.get(conn_type or "")
    if vendor is None:
        raise _refuse(
            conn_id, "connection type", f"one of {', '.join(sorted(_BY_CONN_TYPE))}", repr(conn_type)
        )
    if not isinstance(extra, Mapping):
        raise _refuse(conn_id, "extra", "a JSON object", type(extra).__name__)
    if not isinstance(password, str) or not password.strip():
        raise _refuse(conn_id, "password", f"the {vendor.display_name} API key", "nothing")
    api_key = _header_safe(conn_id, "password (API key)", password, secret=True)
    base_url, params = _base_url(conn_id, vendor, host, port, extra.get("region"))
    if timeout is None and extra.get("timeout") not in (None, ""):
        timeout = _number(conn_id, "timeout", extra["timeout"], integer=False, low=0.001, high=MAX_TIMEOUT)
    elif timeout is not None:
        timeout = _number(conn_id, "timeout", timeout, integer=False, low=0.001, high=MAX_TIMEOUT)
    retries = extra.get("max_retries")
    max_retries = (
        DEFAULT_MAX_RETRIES
        if retries in (None, "")
        else int(_number(conn_id, "max_retries", retries, integer=True, low=0, high=MAX_RETRIES))
    )
    headers: dict[str, str] = {}
    for conn_field in vendor.conn_fields:
        value = extra.get(conn_field.name)
        if conn_field.header is None or value in (None, ""):
            continue
        if not isinstance(value, str | int):
            raise _refuse(conn_id, f"extra {conn_field.name!r}", "text", type(value).__name__)
        what = f"extra {conn_field.name!r}"
        headers[conn_field.header] = _header_safe(conn_id, what, str(value), secret=conn_field.secret)
    return ConnSettings(
        conn_id=conn_id,
        vendor=vendor,
        base_url=base_url,
        api_key=api_key,
        timeout=DEFAULT_TIMEOUT if timeout is None else float(timeout),
        max_retries=max_retries,
        params=params,
        headers=headers,
    )


def proxy_for(url: str) -> str | None:
    """
    Return the proxy the environment names for ``url``, or None for a direct connection.

    ``HTTPS_PROXY``/``HTTP_PROXY`` by scheme, then ``ALL_PROXY``; ``NO_PROXY`` exempts hosts (as curl and
    httpx read them). Both faces connect through what this returns.

    :raises InvalidInputError: for a proxy that is not ``http://`` or ``https://`` (SOCKS is not supported).
    """
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    # The environment's NO_PROXY only, on every platform (proxy_bypass would ask macOS/Windows settings).
    bypass = cast("Any", urllib.request).proxy_bypass_environment
    if not proxy or bypass(parts.netloc, proxies):
        return None
    if "://" not in proxy:
        proxy = f"http://{proxy}"
    if urlsplit(proxy).scheme not in ("http", "https"):
        raise InvalidInputError(
            f"the environment's proxy for {parts.scheme}:// URLs is not http:// or https://; "
            "SOCKS proxies are not supported"
        )
    return proxy


def ssl_context() -> ssl.SSLContext:
    """Return the TLS context of both faces, as httpx builds it (``SSL_CERT_FILE``/``_DIR`` honoured)."""
    return httpx.create_ssl_context()
