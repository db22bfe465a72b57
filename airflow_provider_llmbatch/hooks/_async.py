"""The async face of the batch hook: ``a``-prefixed methods on a loop-shared ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, Self

import httpx

from airflow_provider_llmbatch.exceptions import ConflictError, NotFoundError, VendorAPIError
from airflow_provider_llmbatch.hooks import _pool
from airflow_provider_llmbatch.hooks._base import (
    RECOVERY_SCAN_LIMIT,
    HookBase,
    M,
    Matcher,
    T,
    multipart_headers,
    pick_upload,
    reply,
    scan_page_size,
)
from airflow_provider_llmbatch.hooks._core import (
    ERROR_BODY_LIMIT,
    IDEMPOTENCY_KEY,
    Core,
    MultipartLayout,
    Pager,
    Request,
    multipart_layout,
    source_name,
)
from airflow_provider_llmbatch.hooks._http11 import LeanPool, LeanResponse, request_target
from airflow_provider_llmbatch.hooks._io import CHUNK_SIZE, DownloadSink, LineSplitter, UploadSource
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.retry import Action, classify

if TYPE_CHECKING:
    from airflow_provider_llmbatch.hooks._base import Source

_ASYNC_WRITE_BUFFER = 1024 * 1024
"""Bytes gathered per thread hop when writing a download: file writes stay off the loop, hops stay rare."""


class AsyncFace(HookBase):
    """The async methods of the hook (see :class:`~airflow_provider_llmbatch.hooks.batch.BatchHook`)."""

    # -- async face: transport --------------------------------------------------------------------

    async def _aclient(self) -> tuple[Core, _pool.SharedClient]:
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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _aopen(
        self, request: Request, content: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        core, shared = await self._aclient()
        client = shared.http
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
    ) -> httpx.Response | LeanResponse:
        if content is None:
            core, shared = await self._aclient()
            if shared.lean is not None:
                return await self._alean(core, shared.lean, request)
        response = await self._aopen(request, content, headers)
        try:
            await response.aread()
            return response
        except httpx.TransportError as exc:
            raise self._transport(await self._async_core(), request, exc) from exc
        finally:
            await response.aclose()

    async def _alean(self, core: Core, lean: LeanPool, request: Request) -> LeanResponse:
        """Make a call with an in-memory body on the lean keep-alive pool (see ``_http11``)."""
        started = time.monotonic()
        try:
            response = await lean.request(
                request.method,
                request_target(core.settings.base_url, request.path, request.params),
                core.settings.request_headers(request.headers()),
                request.body,
            )
        except httpx.TransportError as exc:
            self._log_call(request, started, type(exc).__name__)
            raise self._transport(core, request, exc) from exc
        self._log_call(request, started, response.status_code)
        if response.is_success:
            return response
        raise core.error(
            request,
            response.status_code,
            response.reason_phrase,
            response.headers,
            response.content[:ERROR_BODY_LIMIT],
        )

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
            return core.parse(request, *reply(await self._aexchange(request)), model)

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
                body = await self._aexchange(request, content, multipart_headers(layout, src.size))
            finally:
                if owned:
                    await asyncio.to_thread(handle.close)
            return core.parse(request, *reply(body), FileObject)

        # An upload whose answer was lost may be stored already; a blind repeat stores a second copy
        # (and counts against the vendor's stored-file limit). Look for the same name and size first.
        async def recover() -> FileObject | None:
            files = [f async for f in _atake(self.alist_files(purpose=purpose), RECOVERY_SCAN_LIMIT)]
            return pick_upload(iter(files), name, src.size, started)

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
                return core.parse_page(request, *reply(await self._aexchange(request)), model)

            yield pager.feed(await self._aretrying(page_request, once))

    async def adownload_file(
        self, file_id: str, destination: Source, *, expected_bytes: int | None = None
    ) -> int:
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
                self._check_length(core, request, response, sink.written)
                self._check_size(core, request, sink.written, expected_bytes)
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
                    received = 0
                    async for chunk in response.aiter_bytes():
                        received += len(chunk)
                        for line in splitter.feed(chunk):
                            if skip:
                                skip -= 1
                                continue
                            yield line
                            given += 1
                    self._check_length(core, request, response, received)
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
            return core.parse(request, *reply(await self._aexchange(request)), Batch)

        # A create whose answer was lost may have started a batch that is paid for; find it by its
        # idempotency key before creating another. Without a key there is no safe repeat at all.
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
            return core.parse(request, *reply(await self._aexchange(request)), Batch)

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
        pager = core.batch_pager(scan_page_size(core.vendor), {})
        matcher = Matcher(metadata, max_scan)
        async for items in self._aiter_pages("batches", pager, Batch):
            if matcher.feed(items):
                break
        return matcher.best

    async def atest_connection(self) -> tuple[bool, str]:
        """Check the key and base URL like :meth:`test_connection`, without blocking the loop."""
        try:
            core = await self._async_core()
            request = core.list_request("batches", core.batch_pager(1, {}).params())
            core.parse_page(request, *reply(await self._aexchange(request)), Batch)
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {core.vendor.display_name} at {core.settings.base_url}"


async def _async_body(layout: MultipartLayout, handle: IO[bytes]) -> AsyncIterator[bytes]:
    yield layout.head
    while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
        yield chunk
    yield layout.tail


async def _atake(items: AsyncIterator[T], limit: int) -> AsyncIterator[T]:
    count = 0
    async for item in items:
        if count >= limit:
            break
        count += 1
        yield item
