"""
The Batch API hook: files and batches on the sync face, and the async calls a trigger needs.

One hook class per vendor is derived from the registry, so Airflow offers each vendor's connection type.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any

from airflow_provider_llmbatch.exceptions import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    VendorAPIError,
)
from airflow_provider_llmbatch.get_provider_info import hook_class_name
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks._core import (
    RECOVERY_SCAN_LIMIT,
    count_batch_files,
    find_newest,
    pick_upload,
)
from airflow_provider_llmbatch.hooks._io import (
    CheckedBody,
    DownloadSink,
    UploadCheck,
    UploadSource,
    UploadStopped,
    multipart_layout,
    source_name,
)
from airflow_provider_llmbatch.hooks.arguments import IDEMPOTENCY_KEY
from airflow_provider_llmbatch.hooks.base import HookBase
from airflow_provider_llmbatch.hooks.uploads import Cleanup, check_age_days, select_stale
from airflow_provider_llmbatch.models import Batch, FileObject
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

if TYPE_CHECKING:
    import os

    from airflow.sdk import ObjectStoragePath

    Source = str | os.PathLike[str] | IO[bytes] | ObjectStoragePath
    """A local path, a binary file object or an ObjectStoragePath."""


class BatchHook(HookBase):
    """
    Talk to an LLM Batch API (Zhipu, Moonshot, DashScope or any OpenAI-compatible one).

    The connection decides the vendor: its type (``llmbatch_<vendor>``) picks the registry spec. The
    password is the API key; the host is the base URL (empty: the registry's URL for extra ``region``);
    extras ``timeout``, ``max_retries`` and the vendor's header fields apply.

    :param llmbatch_conn_id: the Airflow connection id (default: ``llmbatch_default``).
    :param timeout: seconds per call, overriding the connection's ``timeout`` extra.
    :param retry_policy: the retry policy, overriding the one built from the connection's ``max_retries``.
    """

    conn_name_attr = "llmbatch_conn_id"
    default_conn_name = "llmbatch_default"
    conn_type = REGISTRY["openai"].conn_type
    hook_name = f"LLM Batch ({REGISTRY['openai'].display_name})"

    # -- files ------------------------------------------------------------------------------------------

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

        With ``check`` (a :class:`~airflow_provider_llmbatch.jsonl.RequestFileCheck`) the file is checked in
        the same pass (see :class:`~airflow_provider_llmbatch.hooks._io.CheckedBody`): at the first problem
        the request is aborted unfinished, so the vendor never stores the file, and every problem of the
        file is raised. The check's ``report`` describes the file that was sent.

        :param source: a local path, a binary file object (read from its position) or an ObjectStoragePath.
        :param filename: the name to store it under (default: the source's base name).
        :param purpose: the file purpose (default: ``batch``).
        :param check: check the file as it uploads (default: send it as it is).
        :raises InvalidRequestFileError: from ``check``, when the file breaks a rule (nothing is stored).
        """
        core = self._core()
        src = UploadSource(source)
        src.prepare()
        name = filename or source_name(source)
        layout = multipart_layout({"purpose": purpose}, filename=name)
        request = core.upload()
        headers = layout.headers(src.size)
        started = time.time()

        def once() -> FileObject:
            handle, owned = src.open()
            try:
                if check is None:
                    return core.parse(request, self._send(request, layout.body(handle), headers), FileObject)
                body = CheckedBody(handle, check, source, layout.head, layout.tail)
                try:
                    body.prime()
                    return core.parse(request, self._send(request, body, headers), FileObject)
                except UploadStopped:
                    body.fail()  # the request is gone unfinished: check the rest, unsent, and raise it all
            finally:
                if owned:
                    handle.close()

        # An upload whose answer was lost may be stored already; a blind repeat stores a second copy
        # (and counts against the vendor's stored-file limit). Look for the same name and size first.
        def recover() -> FileObject | None:
            return pick_upload(self.list_files(purpose=purpose), name, src.size, started)

        try:
            has_size = src.size is not None
            return self._retrying(
                request, once, recover=recover if has_size else None, can_repeat=src.can_repeat
            )
        finally:
            if check is not None:
                check.close()

    def get_file(self, file_id: str) -> FileObject:
        """Return a file's metadata."""
        return self._call(self._core().get_file(file_id), FileObject)

    def delete_file(self, file_id: str) -> None:
        """Delete a file (a repeat that finds it gone counts as done)."""
        core = self._core()
        request = core.delete_file(file_id)

        def once() -> None:
            transport.send(self.get_conn(), core, request)

        self._retrying(request, once, on_repeat=(NotFoundError, lambda: None))

    def list_files(
        self,
        *,
        purpose: str | None = None,
        page_size: int | None = None,
        after: str | None = None,
        **filters: Any,
    ) -> Iterator[FileObject]:
        """
        Iterate over all files, page by page; ends even where the vendor pages badly.

        :param purpose: only files of this purpose (filtered locally where the vendor cannot).
        :param page_size: items per page (more than the vendor's maximum is refused, never capped).
            (default: the vendor's largest, from the registry: a whole listing takes the fewest calls)
        :param after: start after this id (a cursor from an earlier listing).
        :param filters: vendor filters from the registry (unknown ones raise ``InvalidInputError``). A
            time filter (DashScope's ``create_after``/``create_before``) takes an aware ``datetime``, sent
            in the registry's format and zone (DashScope: ``yyyyMMddHHmmss`` in Beijing time, UTC+8), or
            text already in that format; a naive ``datetime`` or malformed text is refused before any call.
        """
        core = self._core()
        size = core.file_scan_page_size() if page_size is None else page_size
        pager = core.file_pager(size, purpose, filters, after)
        for items in self._pages("files", pager, FileObject):
            yield from (item for item in items if purpose is None or item.purpose in (None, purpose))

    def check_file_quota(self, needed: int, *, reusable: Mapping[str, int] | None = None) -> None:
        """
        Refuse, before any upload, ``needed`` more batch files than the vendor's per-account quota allows.

        :param needed: the files the job is made of.
        :param reusable: file name -> size of those an earlier try uploaded and this try reuses: the ones the
            account still holds need no new file (counted in the same listing).
        :raises InvalidInputError: with the count held, the quota and how to free space.
        """
        most = self.vendor.limits.max_batch_files
        if most is None:
            return
        held, reused = count_batch_files(self.list_files(purpose="batch"), reusable or {})
        if held + needed - reused > most:
            earlier = f" ({reused} uploaded by an earlier try)" if reused else ""
            raise InvalidInputError(
                f"{self.vendor.display_name} keeps at most {most} batch files per account; this account "
                f"holds {held} and this job needs {needed - reused} more{earlier}. Delete files you no "
                "longer need first, e.g. with CleanupRemoteFilesOperator or "
                "BatchHook.delete_uploaded_files(older_than_days=...)"
            )

    def delete_uploaded_files(self, older_than_days: float, *, dry_run: bool = False) -> Cleanup:
        """
        Delete the request files this provider uploaded more than ``older_than_days`` days ago.

        Only files named as the operators name their uploads are considered (see
        :mod:`~airflow_provider_llmbatch.hooks.uploads`); one that a batch which has not ended still reads
        is kept, and so is one the vendor gives no creation time for. A file that cannot be deleted does
        not stop the others; it is listed in the result's ``failed``.

        :param older_than_days: only files created more than this many days ago (0: all of them).
        :param dry_run: list what would be deleted and delete nothing.
        """
        days = check_age_days(older_than_days)
        cleanup = select_stale(self.list_files(), self.list_batches(), days, dry_run=dry_run)
        for file in [] if dry_run else cleanup.files:
            try:
                self.delete_file(file.id)
            except VendorAPIError as exc:
                cleanup.failed[file.id] = str(exc)
        if cleanup.failed:
            cleanup.files = [file for file in cleanup.files if file.id not in cleanup.failed]
        return cleanup

    def download_file(self, file_id: str, destination: Source, *, expected_bytes: int | None = None) -> int:
        """
        Stream a file's content to a path (whole or not at all), a binary file object or a storage path.

        :param file_id: the file to download.
        :param destination: where to write.
        :param expected_bytes: the file's size as the vendor lists it (``get_file(...).bytes``); a body of
            another size is retried, then refused, instead of landing as the file.
        :return: the number of bytes written.
        """
        core = self._core()
        request = core.file_content(file_id)
        sink = DownloadSink(destination)

        def once() -> int:
            sink.begin()
            with transport.stream(self.get_conn(), core, request) as response:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            # A proxy can answer 200 with a page of its own; only the vendor's listed size tells it apart.
            if expected_bytes and sink.written != expected_bytes:
                raise transport.short_download(core, request, sink.written, expected_bytes)
            sink.commit()
            return sink.written

        try:
            return self._retrying(request, once, can_repeat=sink.can_repeat)
        except BaseException:
            sink.abort()
            raise

    # -- batches ----------------------------------------------------------------------------------------

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

        Every create carries a fresh metadata key ``llmbatch_idem``: a create whose effect is unknown is
        looked up by it (and by its input file) before it is ever repeated.

        :param input_file_id: the uploaded request file.
        :param endpoint: the batch endpoint (default: the vendor's first).
        :param completion_window: the window (default: the vendor's; null where the vendor ignores it).
        :param metadata: string pairs, checked against the vendor's limits (one pair is the hook's).
        :param extra: vendor-only fields (the registry's ``extra_create_fields``).
        """
        core = self._core()
        request, key = core.create_batch(
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            extra=extra,
        )

        # A create whose answer was lost may have started a batch that is paid for: find it first.
        def recover() -> Batch | None:
            found = self.find_batch(metadata={IDEMPOTENCY_KEY: key})
            return found if found is not None and found.input_file_id == input_file_id else None

        return self._retrying(
            request, lambda: core.parse(request, self._send(request, None, {}), Batch), recover=recover
        )

    def get_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        """
        Return a batch.

        :param retry: False for one attempt (a poll loop that owns its own schedule).
        """
        return self._call(self._core().get_batch(batch_id), Batch, retry=retry)

    def cancel_batch(self, batch_id: str) -> Batch:
        """
        Ask the vendor to cancel a batch; return it as the vendor answered (usually ``cancelling``).

        A batch that has already ended is returned as it is: the vendor's refusal is not an error here.
        """
        core = self._core()
        request = core.cancel_batch(batch_id)
        try:
            return self._retrying(request, lambda: core.parse(request, self._send(request, None, {}), Batch))
        except ConflictError:
            # It has ended (or a repeat met the first attempt's effect): what it is now is the answer.
            return self.get_batch(batch_id)

    def list_batches(
        self, *, page_size: int | None = None, after: str | None = None, **filters: Any
    ) -> Iterator[Batch]:
        """
        Iterate over all batches, newest first as the vendor lists them; always terminates.

        :param page_size: items per page (more than the vendor's maximum is refused, never capped).
        :param after: start after this id (a cursor from an earlier listing).
        :param filters: vendor filters from the registry (unknown ones raise ``InvalidInputError``). A
            time filter (DashScope's ``create_after``/``create_before``) takes an aware ``datetime``, sent
            in the registry's format and zone (DashScope: ``yyyyMMddHHmmss`` in Beijing time, UTC+8), or
            text already in that format; a naive ``datetime`` or malformed text is refused before any call.
        """
        pager = self._core().batch_pager(page_size, filters, after)
        for items in self._pages("batches", pager, Batch):
            yield from items

    def find_batch(self, *, metadata: Mapping[str, str], max_scan: int = RECOVERY_SCAN_LIMIT) -> Batch | None:
        """
        Return the newest batch whose metadata contains all ``metadata`` pairs, or None.

        :param metadata: the pairs to match.
        :param max_scan: batches scanned at most (newest first).
        """
        core = self._core()
        pager = core.batch_pager(core.scan_page_size(), {})
        return find_newest(self._pages("batches", pager, Batch), metadata, max_scan)

    def test_connection(self) -> tuple[bool, str]:
        """Check the key and base URL with the cheapest call (one batch listed); never raises."""
        try:
            core = self._core()
            request = core.list_request("batches", core.batch_pager(1, {}).params())
            core.parse_page(request, transport.send(self.get_conn(), core, request), Batch)
        except Exception as exc:
            return False, str(exc)
        return True, f"Connected to {core.vendor.display_name} at {core.settings.base_url}"

    # -- async face: what a trigger needs ------------------------------------------------------------

    async def aget_batch(self, batch_id: str, *, retry: bool = True) -> Batch:
        """Return a batch, without blocking the event loop (see :meth:`get_batch`)."""
        return await self._acall((await self._acore()).get_batch(batch_id), Batch, retry=retry)

    async def acancel_batch(self, batch_id: str) -> Batch:
        """Ask the vendor to cancel a batch, without blocking the event loop (see :meth:`cancel_batch`)."""
        try:
            return await self._acall((await self._acore()).cancel_batch(batch_id), Batch)
        except ConflictError:
            return await self.aget_batch(batch_id)


def _vendor_hook(spec: VendorSpec) -> type[BatchHook]:
    namespace = {
        "__module__": __name__,
        "__doc__": f"Talk to the {spec.display_name} Batch API; connection type ``{spec.conn_type}``.",
        "conn_type": spec.conn_type,
        "hook_name": f"LLM Batch ({spec.display_name})",
    }
    return type(hook_class_name(spec), (BatchHook,), namespace)


VENDOR_HOOKS: Mapping[str, type[BatchHook]] = {
    spec.conn_type: _vendor_hook(spec) for spec in REGISTRY.values()
}
"""Connection type -> the hook class Airflow offers it with, one per vendor in the registry."""

globals().update({hook.__name__: hook for hook in VENDOR_HOOKS.values()})
