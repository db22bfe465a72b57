"""
The Batch API hook: one request-building core, a sync face for workers and an async face for triggers.

Requests are built and responses read in :mod:`~airflow_provider_llmbatch.hooks._core`; this module
adds only the I/O: an ``httpx.Client`` per hook for the sync methods, and for the ``a``-prefixed async
methods an ``httpx.AsyncClient`` shared by every hook on the event loop (see ``_pool``). Retries follow
the one policy in :mod:`airflow_provider_llmbatch.retry`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx
from airflow.sdk import BaseHook

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    ConflictError,
    NotFoundError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks import _pool, errors
from airflow_provider_llmbatch.hooks._core import (
    ERROR_BODY_LIMIT,
    IDEMPOTENCY_KEY,
    ConnSettings,
    Core,
    MultipartLayout,
    Pager,
    Request,
    multipart_layout,
    settings_from_connection,
    source_name,
)
from airflow_provider_llmbatch.hooks._io import CHUNK_SIZE, DownloadSink, LineSplitter, UploadSource
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.retry import Action, RetryPolicy, classify
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

_ASYNC_WRITE_BUFFER = 1024 * 1024


class BatchHook(BaseHook):
    """
    Talk to an LLM Batch API (Zhipu, Moonshot, DashScope or any OpenAI-compatible one).

    The connection decides the vendor: its type (``llmbatch_<vendor>``) picks the registry spec. The
    password is the API key; the host is the base URL (empty: the registry's URL for extra ``region``);
    extras ``timeout``, ``max_retries`` and the vendor's header fields apply.

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
        self._lease: tuple[asyncio.AbstractEventLoop, _pool.PoolKey, httpx.AsyncClient] | None = None

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

    # -- sync face: transport ---------------------------------------------------------------------

    def get_conn(self) -> httpx.Client:
        """Return the hook's own ``httpx.Client`` (created on first use; closed by :meth:`close`)."""
        core = self._sync_core()
        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(core.settings.timeout), follow_redirects=False)
        return self._client

    def close(self) -> None:
        """Close the sync client."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> BatchHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(
        self, request: Request, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """Send ``request`` and return the open streamed response, or raise the typed error."""
        core = self._sync_core()
        client = self.get_conn()
        started = time.monotonic()
        http_request = client.build_request(
            request.method,
            request.url(core.settings),
            params=request.params or None,
            headers=core.settings.request_headers({**request.headers(), **(headers or {})}),
            content=content if content is not None else request.body,
        )
        try:
            response = client.send(http_request, stream=True)
        except httpx.TransportError as exc:
            self._log_call(request, started, type(exc).__name__)
            raise self._transport(core, request, exc) from exc
        self._log_call(request, started, response.status_code)
        if response.is_success:
            return response
        try:
            body = bytearray()
            try:
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) >= ERROR_BODY_LIMIT:
                        break
            except httpx.TransportError:
                pass  # the status says enough; a broken error body is not worth a retry of its own
        finally:
            response.close()
        raise core.error(request, response.status_code, response.reason_phrase, response.headers, bytes(body))

    def _exchange(
        self, request: Request, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """Send ``request`` and return the whole body of its successful response."""
        response = self._open(request, content, headers)
        try:
            return response.read()
        except httpx.TransportError as exc:
            raise self._transport(self._sync_core(), request, exc) from exc
        finally:
            response.close()

    def _retrying(
        self,
        request: Request,
        attempt_once: Callable[[], T],
        *,
        recover: Callable[[], T | None] | None = None,
        settle: tuple[type[VendorAPIError], Callable[[], T]] | None = None,
        can_repeat: Callable[[], bool] | None = None,
    ) -> T:
        attempt = 0
        repeated_unknown = False
        while True:
            attempt += 1
            try:
                return attempt_once()
            except VendorAPIError as exc:
                # A repeat of a call that may have worked meets its own effect (404 on delete, 409 on cancel).
                if settle is not None and repeated_unknown and isinstance(exc, settle[0]):
                    return settle[1]()
                action, wait = self._decide(request, exc, attempt, can_repeat, recover is not None)
                if action is Action.RAISE:
                    raise
                assert self._policy is not None
                self._policy.sleep(wait)
                if action is Action.RECOVER and recover is not None:
                    try:
                        found = recover()
                    except VendorAPIError:
                        raise exc from None
                    if found is not None:
                        self.log.info("%s: found the object created by the failed attempt", request.operation)
                        return found
                repeated_unknown = repeated_unknown or classify(exc) == "unknown"

    def _call(self, request: Request, model: type[M]) -> M:
        core = self._sync_core()

        def once() -> M:
            return core.parse(request, 200, {}, self._exchange(request), model)

        return self._retrying(request, once)

    # -- sync face: files -------------------------------------------------------------------------

    def upload_file(
        self, source: Source, *, filename: str | None = None, purpose: str = "batch"
    ) -> FileObject:
        """
        Upload a request file, streamed as multipart (memory does not grow with the file).

        :param source: a local path, a binary file object (read from its position) or an ObjectStoragePath.
        :param filename: the name to store it under (default: the source's base name).
        :param purpose: the file purpose (default: ``batch``).
        """
        core = self._sync_core()
        src = UploadSource(source)
        src.prepare()
        name = filename or source_name(source)
        layout = multipart_layout({"purpose": purpose}, filename=name)
        request = core.upload()
        started = time.time()

        def once() -> FileObject:
            handle, owned = src.open()
            try:
                content = _sync_body(layout, handle)
                body = self._exchange(request, content, _multipart_headers(layout, src.size))
            finally:
                if owned:
                    handle.close()
            return core.parse(request, 200, {}, body, FileObject)

        def recover() -> FileObject | None:
            return _pick_upload(self.list_files(purpose=purpose), name, src.size, started)

        return self._retrying(
            request, once, recover=recover if src.size is not None else None, can_repeat=src.can_repeat
        )

    def get_file(self, file_id: str) -> FileObject:
        """Return a file's metadata."""
        return self._call(self._sync_core().get_file(file_id), FileObject)

    def delete_file(self, file_id: str) -> None:
        """Delete a file (a repeat that finds it gone counts as done)."""
        request = self._sync_core().delete_file(file_id)

        def once() -> None:
            self._exchange(request)

        self._retrying(request, once, settle=(NotFoundError, lambda: None))

    def list_files(
        self, *, purpose: str | None = None, page_size: int | None = None, **filters: Any
    ) -> Iterator[FileObject]:
        """
        Iterate over all files, page by page; ends even where the vendor pages badly.

        :param purpose: only files of this purpose (filtered locally where the vendor cannot).
        :param page_size: items per page (capped at the vendor's maximum).
        :param filters: vendor filters from the registry (unknown ones raise ``InvalidInputError``).
        """
        pager = self._sync_core().file_pager(page_size, purpose, filters)
        return _only_purpose(self._iter_items("files", pager, FileObject), purpose)

    def _iter_pages(self, kind: str, pager: Pager, model: type[M]) -> Iterator[list[M]]:
        core = self._sync_core()
        while not pager.done:
            page_request: Request = core.list_request(kind, pager.params())

            def once(request: Request = page_request) -> Page[M]:
                return core.parse_page(request, 200, {}, self._exchange(request), model)

            yield pager.feed(self._retrying(page_request, once))

    def _iter_items(self, kind: str, pager: Pager, model: type[M]) -> Iterator[M]:
        for items in self._iter_pages(kind, pager, model):
            yield from items

    def download_file(self, file_id: str, destination: Source) -> int:
        """
        Stream a file's content to a path (whole or not at all), a binary file object or a storage path.

        :param file_id: the file to download.
        :param destination: where to write.
        :return: the number of bytes written.
        """
        core = self._sync_core()
        request = core.file_content(file_id)
        sink = DownloadSink(destination)

        def once() -> int:
            sink.begin()
            response = self._open(request)
            try:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                self._check_length(core, request, response)
            except httpx.TransportError as exc:
                raise self._transport(core, request, exc) from exc
            finally:
                response.close()
            sink.commit()
            return sink.written

        try:
            return self._retrying(request, once, can_repeat=sink.can_repeat)
        except BaseException:
            sink.abort()
            raise

    def _check_length(self, core: Core, request: Request, response: httpx.Response) -> None:
        expected = _content_length(response)
        if expected is not None and response.num_bytes_downloaded < expected:
            raise self._short_body(core, request, response.num_bytes_downloaded, expected)

    def iter_file_lines(self, file_id: str) -> Iterator[bytes]:
        """
        Stream a file's content one line at a time (without line endings; blank lines skipped).

        A broken stream is resumed by downloading again and skipping the lines already given.

        :param file_id: the file to read.
        """
        core = self._sync_core()
        request = core.file_content(file_id, "iter_file_lines")
        assert self._policy is not None
        policy = self._policy
        given = 0
        attempt = 0
        while True:
            attempt += 1
            skip = given
            try:
                response = self._open(request)
                try:
                    splitter = LineSplitter()
                    for chunk in response.iter_bytes():
                        for line in splitter.feed(chunk):
                            if skip:
                                skip -= 1
                                continue
                            yield line
                            given += 1
                    self._check_length(core, request, response)
                    for line in splitter.flush():
                        if not skip:
                            yield line
                            given += 1
                except httpx.TransportError as exc:
                    raise self._transport(core, request, exc) from exc
                finally:
                    response.close()
                return
            except VendorAPIError as exc:
                action, wait = self._decide(request, exc, attempt, None, False)
                if action is Action.RAISE:
                    raise
                policy.sleep(wait)

    # -- sync face: batches -----------------------------------------------------------------------

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str | None = None,
        completion_window: str | None = None,
        metadata: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Batch:
        """
        Create a batch; everything is checked against the vendor spec before it is sent.

        Every create carries the metadata key ``llmbatch_idem`` (the caller's, or a fresh uuid): a create
        whose effect is unknown is looked up by it before it is ever repeated.

        :param input_file_id: the uploaded request file.
        :param endpoint: the batch endpoint (default: the vendor's first).
        :param completion_window: the window (default: the vendor's; null where the vendor ignores it).
        :param metadata: string pairs, checked against the vendor's limits.
        :param extra: vendor-only fields (the registry's ``extra_create_fields``).
        """
        core = self._sync_core()
        request, key = core.create_batch(
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            extra=extra,
        )

        def once() -> Batch:
            return core.parse(request, 200, {}, self._exchange(request), Batch)

        def recover() -> Batch | None:
            return self.find_batch(metadata={IDEMPOTENCY_KEY: key or ""})

        return self._retrying(request, once, recover=recover if key else None)

    def get_batch(self, batch_id: str) -> Batch:
        """Return a batch."""
        return self._call(self._sync_core().get_batch(batch_id), Batch)

    def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the vendor to cancel a batch; return it as the vendor answered (usually ``cancelling``)."""
        core = self._sync_core()
        request = core.cancel_batch(batch_id)

        def once() -> Batch:
            return core.parse(request, 200, {}, self._exchange(request), Batch)

        return self._retrying(request, once, settle=(ConflictError, lambda: self.get_batch(batch_id)))

    def list_batches(self, *, page_size: int | None = None, **filters: Any) -> Iterator[Batch]:
        """
        Iterate over all batches, newest first as the vendor lists them; always terminates.

        :param page_size: items per page (capped at the vendor's maximum).
        :param filters: vendor filters from the registry (unknown ones raise ``InvalidInputError``).
        """
        pager = self._sync_core().batch_pager(page_size, filters)
        return self._iter_items("batches", pager, Batch)

    def find_batch(self, *, metadata: Mapping[str, str], max_scan: int = RECOVERY_SCAN_LIMIT) -> Batch | None:
        """
        Return the newest batch whose metadata contains all ``metadata`` pairs, or None.

        :param metadata: the pairs to match.
        :param max_scan: batches scanned at most (newest first).
        """
        core = self._sync_core()
        pager = core.batch_pager(_scan_page_size(core.vendor), {})
        matcher = _Matcher(metadata, max_scan)
        for items in self._iter_pages("batches", pager, Batch):
            if matcher.feed(items):
                break
        return matcher.best

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with the cheapest call (one batch listed); never raises."""
        try:
            core = self._sync_core()
            request = core.list_request("batches", core.batch_pager(1, {}).params())
            core.parse_page(request, 200, {}, self._exchange(request), Batch)
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {core.vendor.display_name} at {core.settings.base_url}"

    # -- async face: transport --------------------------------------------------------------------

    async def _aclient(self) -> tuple[Core, httpx.AsyncClient]:
        core = await self._async_core()
        loop = asyncio.get_running_loop()
        if self._lease is not None:
            if self._lease[0] is loop:
                return core, self._lease[2]
            # Used from another loop before (e.g. a second asyncio.run): that lease cannot be used here.
            stale, self._lease = self._lease, None
            await _pool.release(stale[0], stale[1])
        key = (core.settings.origin, core.settings.timeout)
        client = await _pool.acquire(key)
        self._lease = (loop, key, client)
        return core, client

    async def aclose(self) -> None:
        """Release the shared async client (it closes when its last user releases it) and the sync one."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await _pool.release(lease[0], lease[1])
        self.close()

    async def __aenter__(self) -> BatchHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _aopen(
        self, request: Request, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        core, client = await self._aclient()
        started = time.monotonic()
        http_request = client.build_request(
            request.method,
            request.url(core.settings),
            params=request.params or None,
            headers=core.settings.request_headers({**request.headers(), **(headers or {})}),
            content=content if content is not None else request.body,
        )
        try:
            response = await client.send(http_request, stream=True)
        except httpx.TransportError as exc:
            self._log_call(request, started, type(exc).__name__)
            raise self._transport(core, request, exc) from exc
        self._log_call(request, started, response.status_code)
        if response.is_success:
            return response
        try:
            body = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= ERROR_BODY_LIMIT:
                        break
            except httpx.TransportError:
                pass  # the status says enough; a broken error body is not worth a retry of its own
        finally:
            await response.aclose()
        raise core.error(request, response.status_code, response.reason_phrase, response.headers, bytes(body))

    async def _aexchange(
        self, request: Request, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> bytes:
        response = await self._aopen(request, content, headers)
        try:
            return await response.aread()
        except httpx.TransportError as exc:
            raise self._transport(await self._async_core(), request, exc) from exc
        finally:
            await response.aclose()

    async def _aretrying(
        self,
        request: Request,
        attempt_once: Callable[[], Awaitable[T]],
        *,
        recover: Callable[[], Awaitable[T | None]] | None = None,
        settle: tuple[type[VendorAPIError], Callable[[], Awaitable[T]]] | None = None,
        can_repeat: Callable[[], bool] | None = None,
    ) -> T:
        attempt = 0
        repeated_unknown = False
        while True:
            attempt += 1
            try:
                return await attempt_once()
            except VendorAPIError as exc:
                if settle is not None and repeated_unknown and isinstance(exc, settle[0]):
                    return await settle[1]()
                action, wait = self._decide(request, exc, attempt, can_repeat, recover is not None)
                if action is Action.RAISE:
                    raise
                assert self._policy is not None
                await self._policy.asleep(wait)
                if action is Action.RECOVER and recover is not None:
                    try:
                        found = await recover()
                    except VendorAPIError:
                        raise exc from None
                    if found is not None:
                        self.log.info("%s: found the object created by the failed attempt", request.operation)
                        return found
                repeated_unknown = repeated_unknown or classify(exc) == "unknown"

    async def _acall(self, request: Request, model: type[M]) -> M:
        core = await self._async_core()

        async def once() -> M:
            return core.parse(request, 200, {}, await self._aexchange(request), model)

        return await self._aretrying(request, once)

    # -- async face: files ------------------------------------------------------------------------

    async def aupload_file(
        self, source: Source, *, filename: str | None = None, purpose: str = "batch"
    ) -> FileObject:
        """Upload a request file like :meth:`upload_file`; file reads run in a worker thread."""
        core = await self._async_core()
        src = UploadSource(source)
        await asyncio.to_thread(src.prepare)
        name = filename or source_name(source)
        layout = multipart_layout({"purpose": purpose}, filename=name)
        request = core.upload()
        started = time.time()

        async def once() -> FileObject:
            handle, owned = await asyncio.to_thread(src.open)
            try:
                content = _async_body(layout, handle)
                body = await self._aexchange(request, content, _multipart_headers(layout, src.size))
            finally:
                if owned:
                    await asyncio.to_thread(handle.close)
            return core.parse(request, 200, {}, body, FileObject)

        async def recover() -> FileObject | None:
            files = [f async for f in _atake(self.alist_files(purpose=purpose), RECOVERY_SCAN_LIMIT)]
            return _pick_upload(iter(files), name, src.size, started)

        return await self._aretrying(
            request, once, recover=recover if src.size is not None else None, can_repeat=src.can_repeat
        )

    async def aget_file(self, file_id: str) -> FileObject:
        """Return a file's metadata."""
        return await self._acall((await self._async_core()).get_file(file_id), FileObject)

    async def adelete_file(self, file_id: str) -> None:
        """Delete a file (a repeat that finds it gone counts as done)."""
        request = (await self._async_core()).delete_file(file_id)

        async def once() -> None:
            await self._aexchange(request)

        async def gone() -> None:
            return None

        await self._aretrying(request, once, settle=(NotFoundError, gone))

    async def alist_files(
        self, *, purpose: str | None = None, page_size: int | None = None, **filters: Any
    ) -> AsyncIterator[FileObject]:
        """Iterate over all files like :meth:`list_files`."""
        pager = (await self._async_core()).file_pager(page_size, purpose, filters)
        async for items in self._aiter_pages("files", pager, FileObject):
            for item in items:
                if purpose is None or item.purpose in (None, purpose):
                    yield item

    async def _aiter_pages(self, kind: str, pager: Pager, model: type[M]) -> AsyncIterator[list[M]]:
        core = await self._async_core()
        while not pager.done:
            page_request: Request = core.list_request(kind, pager.params())

            async def once(request: Request = page_request) -> Page[M]:
                return core.parse_page(request, 200, {}, await self._aexchange(request), model)

            yield pager.feed(await self._aretrying(page_request, once))

    async def adownload_file(self, file_id: str, destination: Source) -> int:
        """Stream a file's content like :meth:`download_file`; file writes run in a worker thread."""
        core = await self._async_core()
        request = core.file_content(file_id)
        sink = DownloadSink(destination)

        async def once() -> int:
            await asyncio.to_thread(sink.begin)
            response = await self._aopen(request)
            try:
                buffer = bytearray()
                async for chunk in response.aiter_bytes():
                    buffer += chunk
                    if len(buffer) >= _ASYNC_WRITE_BUFFER:
                        await asyncio.to_thread(sink.write, bytes(buffer))
                        buffer.clear()
                if buffer:
                    await asyncio.to_thread(sink.write, bytes(buffer))
                self._check_length(core, request, response)
            except httpx.TransportError as exc:
                raise self._transport(core, request, exc) from exc
            finally:
                await response.aclose()
            await asyncio.to_thread(sink.commit)
            return sink.written

        try:
            return await self._aretrying(request, once, can_repeat=sink.can_repeat)
        except BaseException:
            await asyncio.to_thread(sink.abort)
            raise

    async def aiter_file_lines(self, file_id: str) -> AsyncIterator[bytes]:
        """Stream a file's content one line at a time like :meth:`iter_file_lines`."""
        core = await self._async_core()
        request = core.file_content(file_id, "iter_file_lines")
        assert self._policy is not None
        policy = self._policy
        given = 0
        attempt = 0
        while True:
            attempt += 1
            skip = given
            try:
                response = await self._aopen(request)
                try:
                    splitter = LineSplitter()
                    async for chunk in response.aiter_bytes():
                        for line in splitter.feed(chunk):
                            if skip:
                                skip -= 1
                                continue
                            yield line
                            given += 1
                    self._check_length(core, request, response)
                    for line in splitter.flush():
                        if not skip:
                            yield line
                            given += 1
                except httpx.TransportError as exc:
                    raise self._transport(core, request, exc) from exc
                finally:
                    await response.aclose()
                return
            except VendorAPIError as exc:
                action, wait = self._decide(request, exc, attempt, None, False)
                if action is Action.RAISE:
                    raise
                await policy.asleep(wait)

    # -- async face: batches ----------------------------------------------------------------------

    async def acreate_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str | None = None,
        completion_window: str | None = None,
        metadata: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Batch:
        """Create a batch like :meth:`create_batch`."""
        core = await self._async_core()
        request, key = core.create_batch(
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            extra=extra,
        )

        async def once() -> Batch:
            return core.parse(request, 200, {}, await self._aexchange(request), Batch)

        async def recover() -> Batch | None:
            return await self.afind_batch(metadata={IDEMPOTENCY_KEY: key or ""})

        return await self._aretrying(request, once, recover=recover if key else None)

    async def aget_batch(self, batch_id: str) -> Batch:
        """Return a batch."""
        return await self._acall((await self._async_core()).get_batch(batch_id), Batch)

    async def acancel_batch(self, batch_id: str) -> Batch:
        """Ask the vendor to cancel a batch, like :meth:`cancel_batch`."""
        core = await self._async_core()
        request = core.cancel_batch(batch_id)

        async def once() -> Batch:
            return core.parse(request, 200, {}, await self._aexchange(request), Batch)

        async def current() -> Batch:
            return await self.aget_batch(batch_id)

        return await self._aretrying(request, once, settle=(ConflictError, current))

    async def alist_batches(self, *, page_size: int | None = None, **filters: Any) -> AsyncIterator[Batch]:
        """Iterate over all batches like :meth:`list_batches`."""
        pager = (await self._async_core()).batch_pager(page_size, filters)
        async for items in self._aiter_pages("batches", pager, Batch):
            for item in items:
                yield item

    async def afind_batch(
        self, *, metadata: Mapping[str, str], max_scan: int = RECOVERY_SCAN_LIMIT
    ) -> Batch | None:
        """Return the newest batch whose metadata contains all ``metadata`` pairs, like :meth:`find_batch`."""
        core = await self._async_core()
        pager = core.batch_pager(_scan_page_size(core.vendor), {})
        matcher = _Matcher(metadata, max_scan)
        async for items in self._aiter_pages("batches", pager, Batch):
            if matcher.feed(items):
                break
        return matcher.best

    async def atest_connection(self) -> tuple[bool, str]:
        """Check the key and base URL like :meth:`test_connection`, without blocking the loop."""
        try:
            core = await self._async_core()
            request = core.list_request("batches", core.batch_pager(1, {}).params())
            core.parse_page(request, 200, {}, await self._aexchange(request), Batch)
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {core.vendor.display_name} at {core.settings.base_url}"


# -- helpers ------------------------------------------------------------------------------------------


def _content_length(response: httpx.Response) -> int | None:
    raw = response.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _multipart_headers(layout: MultipartLayout, size: int | None) -> dict[str, str]:
    headers = {"Content-Type": layout.content_type}
    length = layout.content_length(size)
    if length is not None:
        headers["Content-Length"] = str(length)
    return headers


def _sync_body(layout: MultipartLayout, handle: IO[bytes]) -> Iterator[bytes]:
    yield layout.head
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk
    yield layout.tail


async def _async_body(layout: MultipartLayout, handle: IO[bytes]) -> AsyncIterator[bytes]:
    yield layout.head
    while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
        yield chunk
    yield layout.tail


def _pick_upload(
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


async def _atake(items: AsyncIterator[T], limit: int) -> AsyncIterator[T]:
    count = 0
    async for item in items:
        if count >= limit:
            break
        count += 1
        yield item


def _only_purpose(items: Iterator[FileObject], purpose: str | None) -> Iterator[FileObject]:
    for item in items:
        if purpose is None or item.purpose in (None, purpose):
            yield item


def _scan_page_size(vendor: VendorSpec) -> int | None:
    most = vendor.batch_list.max_limit
    return min(100, most) if most is not None else None


class _Matcher:
    """Keep the newest batch whose metadata holds every wanted pair; stop after the first matching page."""

    def __init__(self, wanted: Mapping[str, str], max_scan: int) -> None:
        self.wanted = dict(wanted)
        self.max_scan = max_scan
        self.scanned = 0
        self.best: Batch | None = None

    def feed(self, items: list[Batch]) -> bool:
        for batch in items:
            self.scanned += 1
            metadata = batch.metadata or {}
            matches = all(metadata.get(k) == v for k, v in self.wanted.items())
            if matches and (self.best is None or _created(batch) > _created(self.best)):
                self.best = batch
        return self.best is not None or self.scanned >= self.max_scan


def _created(batch: Batch) -> float:
    return batch.created_at.timestamp() if batch.created_at else 0.0


class ZhipuBatchHook(BatchHook):
    """Talk to the Zhipu BigModel (GLM) Batch API; connection type ``llmbatch_zhipu``."""

    conn_type = REGISTRY["zhipu"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['zhipu'].display_name})"


class MoonshotBatchHook(BatchHook):
    """Talk to the Moonshot (Kimi) Batch API; connection type ``llmbatch_moonshot``."""

    conn_type = REGISTRY["moonshot"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['moonshot'].display_name})"


class DashScopeBatchHook(BatchHook):
    """Talk to the Alibaba DashScope (Qwen) Batch API; connection type ``llmbatch_dashscope``."""

    conn_type = REGISTRY["dashscope"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['dashscope'].display_name})"


class OpenAIBatchHook(BatchHook):
    """Talk to an OpenAI-compatible Batch API; connection type ``llmbatch_openai``."""

    conn_type = REGISTRY["openai"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['openai'].display_name})"


VENDOR_HOOKS: Mapping[str, type[BatchHook]] = {
    hook.conn_type: hook for hook in (ZhipuBatchHook, MoonshotBatchHook, DashScopeBatchHook, OpenAIBatchHook)
}
"""Connection type -> hook class, for the provider info."""
