"""The vendor routes: the OpenAI Batch API under each vendor's prefix, answered in the vendor's dialect."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Message, Receive, Scope, Send

from airflow_provider_llmbatch.emulator import dialects
from airflow_provider_llmbatch.emulator.config import EmulatorConfig, OffsetClock
from airflow_provider_llmbatch.emulator.creation import parse_create_body
from airflow_provider_llmbatch.emulator.errors import ApiError, problem_error
from airflow_provider_llmbatch.emulator.faults import AFTER_EFFECT_KINDS, FaultRule, FaultSet, RateLimiter
from airflow_provider_llmbatch.emulator.listing import filter_batches, filter_files, paginate
from airflow_provider_llmbatch.emulator.records import FileInfo, new_request_id
from airflow_provider_llmbatch.emulator.state import Store
from airflow_provider_llmbatch.emulator.uploads import UploadAborted, UploadError, receive_upload
from airflow_provider_llmbatch.emulator.validation import scan_request_file
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of, emulator_prefix
from airflow_provider_llmbatch.vendors import VendorSpec

TRANSPORT_SCOPE_KEY = "llmbatch.transport"

_GATEWAY_PAGE = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


@dataclass
class Runtime:
    """
    Everything the routes share.

    :param config: the settings.
    :param store: files and batches.
    :param faults: fault rules and latency.
    :param limiter: the rate limiter.
    :param api_key: the one key accepted.
    :param clock: the clock batches advance by.
    """

    config: EmulatorConfig
    store: Store
    faults: FaultSet
    limiter: RateLimiter
    api_key: str
    clock: OffsetClock

    def reset(self) -> None:
        """Drop every file, batch, counter, fault and latency; rewind the clock offset."""
        self.store.reset()
        self.faults.clear()
        self.limiter.reset(self.config.rate_limits)
        self.clock.offset = 0.0


class _Reset(Response):
    """Drop the connection without answering (a reset, as a crashed proxy would)."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _drop(scope)
        await _settle()


def _drop(scope: Scope) -> None:
    """Abort the request's connection with a reset (RST), as a crashed proxy would."""
    transport = scope.get(TRANSPORT_SCOPE_KEY)
    if transport is None:
        raise ConnectionAbortedError("emulated connection reset")
    if transport.is_closing():
        return  # the client gave up first (its read timeout): nothing left to drop
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0 makes close() send RST instead of FIN: the client sees a reset, not an EOF.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _LostAnswer(Response):
    """
    Let a request take effect, then break its answer (see the ``*_after`` and ``*_mid_body`` fault kinds).

    :param inner: the real response of the handler.
    :param rule: the fault rule deciding how the answer breaks.
    """

    def __init__(self, inner: Response, rule: FaultRule) -> None:
        super().__init__(status_code=inner.status_code)
        self.inner = inner
        self.rule = rule

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.rule
        if rule.kind in ("reset_after", "stall_after"):
            if rule.kind == "stall_after":
                await asyncio.sleep(rule.delay)
            _drop(scope)
            await _settle()
            return
        budget: list[int | None] = [rule.after_bytes]
        broken = [False]

        async def partial(message: Message) -> None:
            if broken[0]:
                return
            if message["type"] == "http.response.start":
                if budget[0] is None:
                    length = dict(message.get("headers", [])).get(b"content-length")
                    budget[0] = int(length) // 2 if length else 0
                await send(message)
                return
            body = message.get("body", b"")
            left = budget[0] or 0
            if len(body) < left or (len(body) == left and message.get("more_body", False)):
                budget[0] = left - len(body)
                await send(message)
                return
            if left:
                await send({"type": "http.response.body", "body": body[:left], "more_body": True})
            broken[0] = True
            if rule.kind == "stall_mid_body":
                await asyncio.sleep(rule.delay)
            _drop(scope)
            await _settle()

        await self.inner(scope, receive, partial)


async def _settle() -> None:
    # Let the server notice the disconnect, so it does not try to answer on the dead connection.
    for _ in range(3):
        await asyncio.sleep(0)


Handler = Callable[[Request], Awaitable[Response]]


class VendorAPI:
    """
    One vendor's routes.

    :param runtime: the shared state.
    :param spec: the vendor.
    """

    def __init__(self, runtime: Runtime, spec: VendorSpec) -> None:
        self.rt = runtime
        self.spec = spec
        self.dialect = dialect_of(spec)
        self.name = spec.name

    def mount(self) -> Mount:
        """Return the vendor's routes under its prefix."""
        ops: list[tuple[str, str, str, Handler]] = [
            ("/files", "POST", "upload", self._upload),
            ("/files", "GET", "list_files", self._list_files),
            ("/files/{file_id}", "GET", "get_file", self._get_file),
            ("/files/{file_id}", "DELETE", "delete_file", self._delete_file),
            ("/files/{file_id}/content", "GET", "download", self._download),
            ("/batches", "POST", "create", self._create),
            ("/batches", "GET", "list_batches", self._list_batches),
            ("/batches/{batch_id}", "GET", "get_batch", self._get_batch),
            ("/batches/{batch_id}/cancel", "POST", "cancel", self._cancel),
        ]
        routes: list[BaseRoute] = [
            Route(path, self._wrap(op, fn), methods=[method]) for path, method, op, fn in ops
        ]
        routes.append(Route("/{path:path}", self._wrap("unknown", self._unknown), methods=None))
        return Mount(emulator_prefix(self.spec), routes=routes)

    def _wrap(self, operation: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, operation, handler)

        return endpoint

    async def _serve(self, request: Request, operation: str, handler: Handler) -> Response:
        request_id = new_request_id()
        self.rt.store.count(self.name, "requests", operation)
        if self.rt.faults.latency > 0:
            await asyncio.sleep(self.rt.faults.latency)
        rule = self.rt.faults.pick(self.name, operation)
        if rule is not None and rule.kind == "slow":
            await asyncio.sleep(rule.delay)
        elif rule is not None and rule.kind in AFTER_EFFECT_KINDS:
            pass  # the request takes effect below; only its answer is lost
        elif rule is not None:
            if rule.kind == "reset":
                return _Reset()
            await _drain(request)
            return self._with_ids(self._fault_response(rule, request_id), request_id)
        try:
            if not self._authorized(request):
                await _drain(request)
                message = "invalid or missing API key"
                if self.rt.config.echo_credentials:
                    message += f"; got Authorization: {request.headers.get('authorization', '')}"
                raise ApiError("authentication", message)
            wait = self.rt.limiter.check(
                self.name, self.dialect.rate_limits_per_minute, operation, self.rt.store.clock()
            )
            if wait is not None:
                await _drain(request)
                response = self._error(ApiError("rate_limit", "rate limit reached, slow down"), request_id)
                if self.dialect.errors.sends_retry_after:
                    response.headers["Retry-After"] = str(math.ceil(wait))
                return self._with_ids(response, request_id)
            response = await handler(request)
        except ApiError as exc:
            response = self._error(exc, request_id)
        response = self._with_ids(response, request_id)
        if rule is not None and rule.kind in AFTER_EFFECT_KINDS:
            return _LostAnswer(response, rule)
        return response

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.rt.api_key}".encode())

    def _with_ids(self, response: Response, request_id: str) -> Response:
        response.headers.update(dialects.request_id_headers(self.spec, request_id))
        return response

    def _error(self, exc: ApiError, request_id: str) -> Response:
        status, body = dialects.error_payload(
            self.spec, exc.kind, exc.message, request_id=request_id, param=exc.param, status=exc.status
        )
        return JSONResponse(body, status_code=status)

    def _fault_response(self, rule: FaultRule, request_id: str) -> Response:
        if rule.kind == "malformed":
            return Response(b'{"id": "batch_emulated", "object": "bat', media_type="application/json")
        if rule.kind == "html":
            return HTMLResponse(_GATEWAY_PAGE, status_code=502)
        if rule.kind in {"429", "429_retry_after"}:
            response = self._error(ApiError("rate_limit", "too many requests (emulated fault)"), request_id)
            if rule.kind == "429_retry_after":
                response.headers["Retry-After"] = str(math.ceil(max(0.0, rule.retry_after)))
            return response
        return self._error(
            ApiError("server", "server error (emulated fault)", status=int(rule.kind)), request_id
        )

    # files

    async def _upload(self, request: Request) -> Response:
        store, spec = self.rt.store, self.spec
        path = store.new_path(self.name)
        try:
            try:
                upload = await receive_upload(request, path, self.rt.config.upload_bytes_per_second)
            except UploadError as exc:
                raise ApiError("bad_request", str(exc)) from exc
            except UploadAborted:
                # The client aborted its body (a checked upload that found a problem does): no file, and
                # an answer nobody reads. 499 is what proxies log for a request the client closed.
                path.unlink(missing_ok=True)
                return Response(status_code=499)
            if not upload.has_file:
                raise ApiError("bad_request", "expected a multipart part named 'file'", param="file")
            purpose = upload.fields.get("purpose")
            if purpose != "batch":
                raise ApiError("bad_request", f"expected purpose 'batch', got {purpose!r}", param="purpose")
            filename = upload.filename or ""
            if not filename.endswith(".jsonl"):
                raise ApiError("bad_request", f"expected a .jsonl file name, got {filename!r}", param="file")
            if upload.size > spec.limits.max_file_bytes:
                message = f"expected at most {spec.limits.max_file_bytes} bytes, got {upload.size}"
                raise ApiError("file_too_large", message, param="file")
            stored = sum(1 for f in store.list_files(self.name) if f.kind == "input")
            most = spec.limits.max_batch_files
            if most is not None and stored >= most:
                message = f"at most {most} batch files may be stored; delete some"
                raise ApiError("bad_request", message, param="file")
            info: FileInfo | None = None
            if self.dialect.validation_stage == "upload":
                info = await self._scan(path, None, running=False)
                if info.problems:
                    raise problem_error(info.problems[0])
        except ApiError:
            path.unlink(missing_ok=True)
            raise
        record = store.add_file(self.name, path, filename=filename, purpose=purpose, kind="input", info=info)
        store.count(self.name, "files_uploaded")
        return JSONResponse(dialects.render_file(spec, record))

    async def _scan(self, path: Any, endpoint: str | None, *, running: bool = True) -> FileInfo:
        """Check a request file; ``running``: for a batch that runs it (a transient failure is used up)."""
        fails_once = partial(self.rt.store.fails_once, self.name) if running else _never
        return await run_in_threadpool(
            scan_request_file,
            path,
            self.spec,
            endpoint,
            self.rt.store.fail_pattern,
            max_problems=self.rt.config.max_problems,
            fails_once=fails_once,
        )

    async def _list_files(self, request: Request) -> Response:
        list_spec, shape = self.spec.file_list, self.dialect.file_pages
        records = filter_files(list_spec, self.rt.store.list_files(self.name), request.query_params)
        items, has_more = paginate(list_spec, shape, records, request.query_params)
        rendered = [dialects.render_file(self.spec, r) for r in items]
        return JSONResponse(dialects.render_page(shape, rendered, has_more))

    def _file_or_404(self, request: Request) -> Any:
        file_id = request.path_params["file_id"]
        record = self.rt.store.get_file(self.name, file_id)
        if record is None:
            raise ApiError("not_found", f"no file {file_id!r}", param="file_id")
        return record

    async def _get_file(self, request: Request) -> Response:
        return JSONResponse(dialects.render_file(self.spec, self._file_or_404(request)))

    async def _delete_file(self, request: Request) -> Response:
        record = self._file_or_404(request)
        await run_in_threadpool(self.rt.store.delete_file, self.name, record.id)
        self.rt.store.count(self.name, "files_deleted")
        return JSONResponse({"id": record.id, "object": "file", "deleted": True})

    async def _download(self, request: Request) -> Response:
        record = self._file_or_404(request)
        if record.kind == "input" and not self.spec.input_content_downloadable:
            message = "only batch output and error files can be downloaded"
            raise ApiError("permission_denied", message, param="file_id")
        self.rt.store.count(self.name, "downloads")
        return FileResponse(record.path, media_type="application/octet-stream", filename=record.filename)

    # batches

    async def _create(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError("bad_request", "expected a JSON object body") from exc
        params = parse_create_body(self.spec, body)
        record = self.rt.store.get_file(self.name, params.input_file_id)
        if record is None:
            raise ApiError("not_found", f"no file {params.input_file_id!r}", param="input_file_id")
        if record.kind != "input":
            raise ApiError(
                "bad_request", "the input file must be a batch request file", param="input_file_id"
            )
        info = await self._scan(record.path, params.endpoint)
        if info.problems and self.dialect.validation_stage != "async":
            raise problem_error(info.problems[0])
        batch = self.rt.store.create_batch(
            self.name,
            endpoint=params.endpoint,
            input_file=record,
            completion_window=params.completion_window,
            metadata=params.metadata,
            extra=params.extra,
            info=info,
        )
        return JSONResponse(dialects.render_batch(self.spec, batch))

    async def _list_batches(self, request: Request) -> Response:
        list_spec, shape = self.spec.batch_list, self.dialect.batch_pages
        batches = await run_in_threadpool(self.rt.store.list_batches, self.name)
        records = filter_batches(list_spec, batches, request.query_params)
        items, has_more = paginate(list_spec, shape, records, request.query_params)
        rendered = [dialects.render_batch(self.spec, b) for b in items]
        return JSONResponse(dialects.render_page(shape, rendered, has_more))

    async def _get_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch = await run_in_threadpool(self.rt.store.get_batch, self.name, batch_id)
        if batch is None:
            raise ApiError("not_found", f"no batch {batch_id!r}", param="batch_id")
        return JSONResponse(dialects.render_batch(self.spec, batch))

    async def _cancel(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        batch, accepted = await run_in_threadpool(self.rt.store.cancel_batch, self.name, batch_id)
        if batch is None:
            raise ApiError("not_found", f"no batch {batch_id!r}", param="batch_id")
        if not accepted:
            message = f"batch {batch_id!r} is {batch.status} and can no longer be cancelled"
            raise ApiError("conflict", message, status=self.spec.cancel_terminal_status)
        return JSONResponse(dialects.render_batch(self.spec, batch))

    async def _unknown(self, request: Request) -> Response:
        raise ApiError("not_found", f"no route {request.method} {request.url.path}")


async def _drain(request: Request) -> None:
    """Read and drop a request body the handler will not read, so the client can finish sending."""
    try:
        async for _ in request.stream():
            pass
    except RuntimeError:
        # The body was consumed already.
        return


def _never(_: str) -> bool:
    return False
