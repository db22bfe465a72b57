"""
What both faces of the hook share: the connection, the retry decision, logging and small helpers.

Requests are built and responses read in :mod:`~airflow_provider_llmbatch.hooks._core`; the sync face
(:mod:`._sync`) and the async face (:mod:`._async`) add only their I/O on top of this base.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx
from airflow.sdk import BaseHook

from airflow_provider_llmbatch.exceptions import APIConnectionError, VendorAPIError
from airflow_provider_llmbatch.hooks import _pool, errors
from airflow_provider_llmbatch.hooks._core import (
    ConnSettings,
    Core,
    MultipartLayout,
    Request,
    settings_from_connection,
)
from airflow_provider_llmbatch.hooks._http11 import LeanResponse
from airflow_provider_llmbatch.models import Batch, FileObject
from airflow_provider_llmbatch.retry import Action, RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

if TYPE_CHECKING:
    from typing import TypeAlias

    from airflow.sdk import ObjectStoragePath

    Source: TypeAlias = str | os.PathLike[str] | IO[bytes] | ObjectStoragePath
    """A local path, a binary file object or an ObjectStoragePath."""

T = TypeVar("T")
M = TypeVar("M", Batch, FileObject)

UPLOAD_LOOKBACK_SECONDS = 300.0
"""How far back an upload of unknown effect is looked for (covers clock skew with the vendor)."""

RECOVERY_SCAN_LIMIT = 1000
"""Objects scanned at most when looking for a create or upload of unknown effect."""


class HookBase(BaseHook):
    """
    Hold the connection settings, the retry policy and the clients of a batch hook.

    :param llmbatch_conn_id: the Airflow connection id (default: ``llmbatch_default``).
    :param timeout: seconds per request, overriding the connection's ``timeout`` extra.
    :param retry_policy: the retry policy, overriding the one built from the connection's ``max_retries``.
    """

    conn_name_attr = "llmbatch_conn_id"
    default_conn_name = "llmbatch_default"
    conn_type = REGISTRY["openai"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['openai'].display_name})"

    def __init__(
        self,
        llmbatch_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        super().__init__()
        self.llmbatch_conn_id = llmbatch_conn_id
        self.conn_id = llmbatch_conn_id
        self._timeout = timeout
        self._retry_policy = retry_policy
        self._core: Core | None = None
        self._policy: RetryPolicy | None = None
        self._client: httpx.Client | None = None
        self._lease: tuple[asyncio.AbstractEventLoop, _pool.PoolKey, _pool.SharedClient] | None = None

    # -- connection ---------------------------------------------------------------------------------

    def _settings_from(self, conn: Any, extra: Mapping[str, Any]) -> ConnSettings:
        return settings_from_connection(
            self.conn_id,
            conn_type=conn.conn_type,
            host=conn.host,
            password=conn.password,
            extra=extra,
            port=conn.port,
            timeout=self._timeout,
        )

    def _use(self, settings: ConnSettings) -> Core:
        self._core = Core(settings)
        base = self._retry_policy or RetryPolicy()
        self._policy = base if self._retry_policy else base.with_max_retries(settings.max_retries)
        return self._core

    def _sync_core(self) -> Core:
        if self._core is None:
            from airflow.sdk.log import mask_secret

            conn = self.get_connection(self.conn_id)
            settings = self._settings_from(conn, conn.extra_dejson)
            for secret in settings.secret_values():
                mask_secret(secret)
            self._use(settings)
        assert self._core is not None
        return self._core

    async def _async_core(self) -> Core:
        if self._core is None:
            from airflow.sdk.log import amask_secret

            conn = await BaseHook.aget_connection(self.conn_id)
            settings = self._settings_from(conn, await conn.aextra_dejson())
            for secret in settings.secret_values():
                await amask_secret(secret)
            self._use(settings)
        assert self._core is not None
        return self._core

    @property
    def vendor(self) -> VendorSpec:
        """Return the vendor spec of the connection (looked up synchronously on first use)."""
        return self._sync_core().vendor

    async def aget_vendor(self) -> VendorSpec:
        """Return the vendor spec of the connection, looked up without blocking the event loop."""
        return (await self._async_core()).vendor

    @property
    def retry_policy(self) -> RetryPolicy:
        """Return the retry policy in force (after the connection is read)."""
        self._sync_core()
        assert self._policy is not None
        return self._policy

    # -- shared helpers ---------------------------------------------------------------------------

    def _log_call(self, request: Request, started: float, outcome: int | str) -> None:
        self.log.debug(
            "%s %s %s -> %s in %.3fs",
            request.operation,
            request.method,
            request.path,
            outcome,
            time.monotonic() - started,
        )

    def _transport(self, core: Core, request: Request, exc: httpx.TransportError) -> APIConnectionError:
        return errors.transport_error(
            exc,
            vendor=core.vendor,
            conn_id=core.settings.conn_id,
            operation=request.operation,
            secret=core.settings.api_key,
        )

    def _short_body(self, core: Core, request: Request, got: int, expected: int) -> APIConnectionError:
        return APIConnectionError(
            f"the response body ended after {got} of {expected} bytes",
            vendor=core.vendor.name,
            conn_id=core.settings.conn_id,
            operation=request.operation,
        )

    def _check_size(self, core: Core, request: Request, got: int, expected: int | None) -> None:
        # A proxy can answer 200 with a page of its own and a matching Content-Length; only the size the
        # vendor lists tells that body from the file.
        if expected is not None and expected > 0 and got != expected:
            raise APIConnectionError(
                f"the download has {got} bytes, the vendor lists the file at {expected} bytes",
                vendor=core.vendor.name,
                conn_id=core.settings.conn_id,
                operation=request.operation,
            )

    def _decide(
        self,
        request: Request,
        exc: VendorAPIError,
        attempt: int,
        can_repeat: Callable[[], bool] | None,
        recoverable: bool,
    ) -> tuple[Action, float]:
        assert self._policy is not None
        decision = self._policy.decide(exc, attempt=attempt, idempotent=request.idempotent)
        if decision.action is Action.RAISE or (can_repeat is not None and not can_repeat()):
            return Action.RAISE, 0.0
        if decision.action is Action.RECOVER and not recoverable:
            # No way to tell whether the call took effect: a blind repeat could pay twice.
            return Action.RAISE, 0.0
        self.log.warning(
            "%s failed (%s); retrying in %.1fs (retry %d of %d)",
            request.operation,
            exc,
            decision.wait,
            attempt,
            self._policy.max_retries,
        )
        return decision.action, decision.wait

    def close(self) -> None:
        """Close the sync client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _check_length(self, core: Core, request: Request, response: httpx.Response, decoded: int) -> None:
        expected = _content_length(response)
        # Content-Length counts the bytes on the wire; without a content encoding those are the bytes read.
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        got = response.num_bytes_downloaded if encoded else decoded
        if expected is not None and got < expected:
            raise self._short_body(core, request, got, expected)


# -- helpers ------------------------------------------------------------------------------------------


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def reply(response: httpx.Response | LeanResponse) -> tuple[int, httpx.Headers, bytes]:
    """Return what the core reads from a finished response: status, headers (request id), body."""
    return response.status_code, response.headers, response.content


def multipart_headers(layout: MultipartLayout, size: int | None) -> dict[str, str]:
    """Return an upload's headers; without a known size the body goes chunked."""
    headers = {"Content-Type": layout.content_type}
    length = layout.content_length(size)
    if length is not None:
        headers["Content-Length"] = str(length)
    return headers


def pick_upload(
    files: Iterator[FileObject], name: str, size: int | None, started: float
) -> FileObject | None:
    """Return the newest file that looks like our upload: same name and size, created since we started."""
    best: FileObject | None = None
    for scanned, item in enumerate(files):
        if scanned >= RECOVERY_SCAN_LIMIT:
            break
        created = item.created_at.timestamp() if item.created_at else None
        if (
            item.filename == name
            and item.bytes == size
            and created is not None
            and created >= started - UPLOAD_LOOKBACK_SECONDS
            and (best is None or created > (best.created_at.timestamp() if best.created_at else 0))
        ):
            best = item
    return best


def scan_page_size(vendor: VendorSpec) -> int | None:
    """Return the page size for scans: large pages, few calls (DashScope allows 100 lists a minute)."""
    most = vendor.batch_list.max_limit
    return min(100, most) if most is not None else None


class Matcher:
    """Keep the newest batch whose metadata holds every wanted pair; stop after the first matching page."""

    def __init__(self, wanted: Mapping[str, str], max_scan: int) -> None:
        self.wanted = dict(wanted)
        self.max_scan = max_scan
        self.scanned = 0
        self.best: Batch | None = None

    def feed(self, items: list[Batch]) -> bool:
        """Take one page; return True when the scan can stop."""
        for batch in items:
            self.scanned += 1
            metadata = batch.metadata or {}
            matches = all(metadata.get(k) == v for k, v in self.wanted.items())
            if matches and (self.best is None or _created(batch) > _created(self.best)):
                self.best = batch
        return self.best is not None or self.scanned >= self.max_scan


def _created(batch: Batch) -> float:
    return batch.created_at.timestamp() if batch.created_at else 0.0
