"""
The I/O-free core of the hook: request building, response parsing, paging, finding lost creations.

Both faces of :class:`~airflow_provider_llmbatch.hooks.batch.BatchHook` (sync for workers, async for
triggers) build every request and read every response here; they add only the I/O. Everything that
differs between vendors is read from the :class:`~airflow_provider_llmbatch.vendors.VendorSpec`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import pydantic

from airflow_provider_llmbatch.exceptions import (
    InvalidInputError,
    MalformedResponseError,
    VendorAPIError,
    WrongObjectError,
)
from airflow_provider_llmbatch.hooks import errors
from airflow_provider_llmbatch.hooks.arguments import create_body
from airflow_provider_llmbatch.hooks.paging import Pager, filter_value
from airflow_provider_llmbatch.hooks.settings import ConnSettings
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.vendors import ListSpec

M = TypeVar("M", Batch, FileObject)

UPLOAD_LOOKBACK_SECONDS = 300.0
"""How far back an upload of unknown effect is looked for (covers clock skew with the vendor)."""

RECOVERY_SCAN_LIMIT = 1000
"""Objects scanned at most when looking for a create or upload of unknown effect."""


@dataclass(frozen=True)
class Reply:
    """
    A successful answer, read whole.

    :param status: the HTTP status.
    :param headers: the response headers (case-insensitive).
    :param body: the decoded body.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Request:
    """
    One API call, independent of the client that sends it.

    :param operation: the hook operation, for messages and logs.
    :param method: the HTTP method.
    :param path: the path under the base URL.
    :param params: query parameters.
    :param body: a JSON body, already encoded.
    :param idempotent: whether repeating it is harmless whatever its effect.
    :param object_id: the id of the one object the answer must be about, if any.
    """

    operation: str
    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    idempotent: bool = True
    object_id: str | None = None

    def url(self, settings: ConnSettings) -> str:
        """Return the absolute URL for the connection's base URL."""
        return settings.base_url + self.path

    def headers(self) -> dict[str, str]:
        """Return the content headers of the body, if any."""
        return {"Content-Type": "application/json"} if self.body is not None else {}


def _segment(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
    return quote(value, safe="")


class Core:
    """
    Build requests and read responses for one connection; no I/O.

    :param settings: the connection's settings.
    """

    def __init__(self, settings: ConnSettings) -> None:
        self.settings = settings
        self.vendor = settings.vendor

    # -- requests ---------------------------------------------------------------------------------

    def upload(self) -> Request:
        """Return the upload request (its multipart body is streamed by the face)."""
        return Request("upload_file", "POST", "/files", idempotent=False)

    def get_file(self, file_id: str) -> Request:
        """Return the request that reads a file object."""
        return Request("get_file", "GET", f"/files/{_segment('file_id', file_id)}", object_id=file_id)

    def delete_file(self, file_id: str) -> Request:
        """Return the request that deletes a file."""
        return Request("delete_file", "DELETE", f"/files/{_segment('file_id', file_id)}")

    def file_content(self, file_id: str, operation: str = "download_file") -> Request:
        """Return the request that streams a file's content."""
        return Request(operation, "GET", f"/files/{_segment('file_id', file_id)}/content")

    def get_batch(self, batch_id: str) -> Request:
        """Return the request that reads a batch."""
        return Request("get_batch", "GET", f"/batches/{_segment('batch_id', batch_id)}", object_id=batch_id)

    def cancel_batch(self, batch_id: str) -> Request:
        """Return the request that cancels a batch (repeating a cancel is harmless)."""
        path = f"/batches/{_segment('batch_id', batch_id)}/cancel"
        return Request("cancel_batch", "POST", path, object_id=batch_id)

    def list_request(self, kind: str, params: Mapping[str, str]) -> Request:
        """Return the request of one list page (``kind``: ``files`` or ``batches``)."""
        return Request(f"list_{kind}", "GET", f"/{kind}", params=dict(params))

    def _pager(
        self, spec: ListSpec, what: str, page_size: int | None, filters: Mapping[str, Any], after: str | None
    ) -> Pager:
        name = self.vendor.display_name
        if page_size is not None:
            most = spec.max_limit if "limit" in spec.params else None
            if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
                raise InvalidInputError(f"page_size must be a positive integer, got {page_size!r}")
            if most is not None and page_size > most:
                raise InvalidInputError(
                    f"page_size: {name} lists at most {most} {what}s a page, got {page_size}"
                )
        if after is not None and (not isinstance(after, str) or not after.strip()):
            raise InvalidInputError(f"after: expected the id of a listed {what}, got {after!r}")
        if after is not None and "after" not in spec.params:
            raise InvalidInputError(f"after: the {name} {what} list has no cursor to start from")
        allowed = sorted(spec.params - {"after", "limit"})
        unknown = sorted(k for k in filters if k not in allowed)
        if unknown:
            raise InvalidInputError(
                f"{name} {what} list does not accept filter(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
        params = {k: filter_value(self.vendor, spec, k, v) for k, v in filters.items() if v is not None}
        return Pager(spec, params, page_size, after)

    def scan_page_size(self) -> int | None:
        """Return the page size for scans: large pages, few calls (DashScope allows 100 lists a minute)."""
        most = self.vendor.batch_list.max_limit
        return min(100, most) if most is not None else None

    def file_scan_page_size(self) -> int | None:
        """Return the page size of a whole file listing: the vendor's largest (DashScope: 2,000)."""
        spec = self.vendor.file_list
        return spec.max_limit if "limit" in spec.params else None

    def batch_pager(
        self, page_size: int | None, filters: Mapping[str, Any], after: str | None = None
    ) -> Pager:
        """Return a pager over batches; unknown filters raise :class:`InvalidInputError`."""
        return self._pager(self.vendor.batch_list, "batch", page_size, filters, after)

    def file_pager(
        self, page_size: int | None, purpose: str | None, filters: Mapping[str, Any], after: str | None = None
    ) -> Pager:
        """Return a pager over files; ``purpose`` is sent where the vendor filters by it."""
        if purpose is not None and "purpose" in self.vendor.file_list.params:
            filters = {**filters, "purpose": purpose}
        return self._pager(self.vendor.file_list, "file", page_size, filters, after)

    def create_batch(
        self,
        *,
        input_file_id: str,
        endpoint: str | None,
        completion_window: str | None,
        metadata: Mapping[str, str] | None,
        extra: Mapping[str, Any] | None,
    ) -> tuple[Request, str]:
        """
        Return the create request and the fresh idempotency key it carries in its metadata.

        Everything is checked against the vendor spec before anything is sent.

        :param input_file_id: the uploaded request file.
        :param endpoint: the batch endpoint (default: the vendor's first).
        :param completion_window: the window (default: the vendor's; null where the vendor ignores it).
        :param metadata: the caller's metadata.
        :param extra: vendor-only fields (``spec.extra_create_fields``).
        """
        _segment("input_file_id", input_file_id)
        key = uuid.uuid4().hex
        body = create_body(
            self.vendor,
            input_file_id=input_file_id,
            endpoint=endpoint,
            completion_window=completion_window,
            metadata=metadata,
            extra=extra,
            idempotency_key=key,
        )
        return Request(
            "create_batch", "POST", "/batches", body=json.dumps(body).encode(), idempotent=False
        ), key

    # -- responses --------------------------------------------------------------------------------

    def error(
        self, request: Request, status: int, reason: str, headers: Mapping[str, str], content: bytes
    ) -> VendorAPIError:
        """Return the typed exception for an error response to ``request``."""
        return errors.error_from_response(
            self.vendor,
            status=status,
            reason=reason,
            headers=headers,
            content=content,
            conn_id=self.settings.conn_id,
            operation=request.operation,
            secret=self.settings.api_key,
        )

    def _json(self, request: Request, reply: Reply) -> Any:
        try:
            return json.loads(reply.body)
        except (ValueError, RecursionError):
            raise self._malformed(request, reply, f"the {request.operation} response is not JSON") from None

    def _malformed(
        self,
        request: Request,
        reply: Reply,
        what: str,
        cls: type[MalformedResponseError] = MalformedResponseError,
    ) -> MalformedResponseError:
        request_id = errors.request_id_from(self.vendor, reply.headers, None)
        return cls(
            what,
            vendor=self.vendor.name,
            conn_id=self.settings.conn_id,
            operation=request.operation,
            status_code=reply.status,
            request_id=errors.redact(request_id, self.settings.api_key) if request_id else None,
        )

    def parse(self, request: Request, reply: Reply, model: type[M]) -> M:
        """
        Return the response as ``model``; a body that is not one raises :class:`MalformedResponseError`.

        An answer about another object than the request's (``request.object_id``) raises
        :class:`WrongObjectError`: a cache or a routing fault upstream, never our object.
        """
        data = self._json(request, reply)
        try:
            parsed = model.model_validate(data)
        except pydantic.ValidationError as exc:
            summary = errors.summarize_validation(exc)
            what = f"the {request.operation} response is not a {model.__name__}: {summary}"
            raise self._malformed(request, reply, what) from None
        if request.object_id is not None and parsed.id != request.object_id:
            what = f"asked for {request.object_id!r}, the answer is about {parsed.id!r}"
            raise self._malformed(request, reply, what, WrongObjectError)
        return parsed

    def parse_page(self, request: Request, reply: Reply, model: type[M]) -> Page[M]:
        """Return the response as a page of ``model``; items without an id are skipped, not fatal."""
        data = self._json(request, reply)
        if not isinstance(data, Mapping):
            raise self._malformed(request, reply, f"the {request.operation} response is not an object")
        items = data.get("data")
        valid: list[Any] = []
        for item in items if isinstance(items, list) else []:
            try:
                valid.append(model.model_validate(item))
            except pydantic.ValidationError:
                continue
        try:
            page = Page[model].model_validate({**data, "data": []})  # type: ignore[valid-type]
        except pydantic.ValidationError as exc:
            summary = errors.summarize_validation(exc)
            raise self._malformed(
                request, reply, f"the {request.operation} page is malformed: {summary}"
            ) from None
        return page.model_copy(update={"data": valid})


# -- finding what a call of unknown effect made ---------------------------------------------------------


def pick_upload(
    files: Iterable[FileObject], name: str, size: int | None, started: float
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
            and (best is None or created > _created(best))
        ):
            best = item
    return best


def count_batch_files(files: Iterable[FileObject], reusable: Mapping[str, int]) -> tuple[int, int]:
    """
    Return how many files are listed, and how many of them are uploads a retry reuses.

    :param reusable: file name -> size of the uploads an earlier try made that this try reuses if the
        account still holds them whole (same name and size, not failed or deleted).
    """
    held = 0
    found: set[str] = set()
    for item in files:
        held += 1
        name = item.filename
        if name is not None and name in reusable and item.holds_whole(reusable[name]):
            found.add(name)
    return held, len(found)


def find_newest(batches: Iterable[list[Batch]], wanted: Mapping[str, str], max_scan: int) -> Batch | None:
    """Return the newest batch whose metadata holds every wanted pair; stop after the first matching page."""
    best: Batch | None = None
    scanned = 0
    for page in batches:
        for batch in page:
            scanned += 1
            metadata = batch.metadata or {}
            if all(metadata.get(k) == v for k, v in wanted.items()) and (
                best is None or _created(batch) > _created(best)
            ):
                best = batch
        if best is not None or scanned >= max_scan:
            break
    return best


def _created(item: Batch | FileObject) -> float:
    return item.created_at.timestamp() if item.created_at else 0.0
