"""The sync face of the batch hook: one ``httpx.Client`` per hook, for workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, Self

import httpx

from airflow_provider_llmbatch.exceptions import ConflictError, NotFoundError, VendorAPIError
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
    MultipartLayout,
    Pager,
    Request,
    multipart_layout,
    source_name,
)
from airflow_provider_llmbatch.hooks._io import (
    CHUNK_SIZE,
    CheckedBody,
    DownloadSink,
    LineSplitter,
    UploadCheck,
    UploadSource,
    UploadStopped,
)
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.retry import Action, classify

if TYPE_CHECKING:
    from airflow_provider_llmbatch.hooks._base import Source


class SyncFace(HookBase):
    """The blocking methods of the hook (see :class:`~airflow_provider_llmbatch.hooks.batch.BatchHook`)."""

    # -- sync face: transport ---------------------------------------------------------------------

    def get_conn(self) -> httpx.Client:
        """Return the hook's own ``httpx.Client`` (created on first use; closed by :meth:`close`)."""
        core = self._sync_core()
        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(core.settings.timeout), follow_redirects=False)
        return self._client

    def __enter__(self) -> Self:
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
    ) -> httpx.Response:
        """Send ``request`` and return its successful response, read whole."""
        response = self._open(request, content, headers)
        try:
            response.read()
            return response
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
            return core.parse(request, *reply(self._exchange(request)), model)

        return self._retrying(request, once)

    # -- sync face: files -------------------------------------------------------------------------

    def upload_file(
        self,
        source: Source,
        *,
        filename: str | None = None,
        purpose: str = "batch",
        check: UploadCheck | None = None,
    ) -> FileObject:
        """
        Upload a request file, streamed as multipart (memory does not grow with the file).

        With ``check`` (a :class:`~airflow_provider_llmbatch.jsonl.RequestFileCheck`) the file is checked
        as it streams, in the same pass: each chunk is sent only after the lines it completes passed,
        and the last chunk and the closing boundary only after the whole file passed. At the first
        problem the request is aborted unfinished, so the vendor never stores the file; the rest of the
        file is then checked (unsent) and every problem raised at once. A file whose problems show in its
        first megabyte, or that fits in it, costs no request at all. The check's ``report`` describes
        the file that was sent.

        :param source: a local path, a binary file object (read from its position) or an ObjectStoragePath.
        :param filename: the name to store it under (default: the source's base name).
        :param purpose: the file purpose (default: ``batch``).
        :param check: check the file as it uploads (default: send it as it is).
        :raises InvalidRequestFileError: from ``check``, when the file breaks a rule (nothing is stored).
        """
        core = self._sync_core()
        src = UploadSource(source)
        src.prepare()
        name = filename or source_name(source)
        layout = multipart_layout({"purpose": purpose}, filename=name)
        request = core.upload()
        headers = multipart_headers(layout, src.size)
        started = time.time()

        def once() -> FileObject:
            handle, owned = src.open()
            try:
                if check is None:
                    body = self._exchange(request, _sync_body(layout, handle), headers)
                else:
                    checked = CheckedBody(handle, check, source, layout.head, layout.tail)
                    body = self._checked_exchange(request, checked, headers)
            finally:
                if owned:
                    handle.close()
            return core.parse(request, *reply(body), FileObject)

        # An upload whose answer was lost may be stored already; a blind repeat stores a second copy
        # (and counts against the vendor's stored-file limit). Look for the same name and size first.
        def recover() -> FileObject | None:
            return pick_upload(self.list_files(purpose=purpose), name, src.size, started)

        try:
            return self._retrying(
                request, once, recover=recover if src.size is not None else None, can_repeat=src.can_repeat
            )
        finally:
            if check is not None:
                check.close()

    def _checked_exchange(
        self, request: Request, body: CheckedBody, headers: Mapping[str, str]
    ) -> httpx.Response:
        """Send a checked upload; a file failing its check aborts the request, then raises every problem."""
        try:
            body.prime()
            return self._exchange(request, body, headers)
        except UploadStopped:
            pass
        # The request (if it started) is gone with its body unfinished; list every problem of the file.
        body.fail()

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
                return core.parse_page(request, *reply(self._exchange(request)), model)

            yield pager.feed(self._retrying(page_request, once))

    def _iter_items(self, kind: str, pager: Pager, model: type[M]) -> Iterator[M]:
        for items in self._iter_pages(kind, pager, model):
            yield from items

    def download_file(self, file_id: str, destination: Source, *, expected_bytes: int | None = None) -> int:
        """
        Stream a file's content to a path (whole or not at all), a binary file object or a storage path.

        :param file_id: the file to download.
        :param destination: where to write.
        :param expected_bytes: the file's size as the vendor lists it (``get_file(...).bytes``); a body of
            another size is retried, then refused, instead of landing as the file.
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
                self._check_length(core, request, response, sink.written)
                self._check_size(core, request, sink.written, expected_bytes)
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
                    received = 0
                    for chunk in response.iter_bytes():
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
            return core.parse(request, *reply(self._exchange(request)), Batch)

        # A create whose answer was lost may have started a batch that is paid for; find it by its
        # idempotency key before creating another. Without a key there is no safe repeat at all.
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
            return core.parse(request, *reply(self._exchange(request)), Batch)

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
        pager = core.batch_pager(scan_page_size(core.vendor), {})
        matcher = Matcher(metadata, max_scan)
        for items in self._iter_pages("batches", pager, Batch):
            if matcher.feed(items):
                break
        return matcher.best

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with the cheapest call (one batch listed); never raises."""
        try:
            core = self._sync_core()
            request = core.list_request("batches", core.batch_pager(1, {}).params())
            core.parse_page(request, *reply(self._exchange(request)), Batch)
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {core.vendor.display_name} at {core.settings.base_url}"


def _sync_body(layout: MultipartLayout, handle: IO[bytes]) -> Iterator[bytes]:
    yield layout.head
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk
    yield layout.tail


def _only_purpose(items: Iterator[FileObject], purpose: str | None) -> Iterator[FileObject]:
    for item in items:
        if purpose is None or item.purpose in (None, purpose):
            yield item
