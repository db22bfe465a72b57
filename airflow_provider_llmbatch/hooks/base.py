"""
What every call of the hook goes through: the connection (read once), both faces' clients, the retry loop.

:class:`~airflow_provider_llmbatch.hooks.batch.BatchHook` adds the API on top. Requests are built and
answers read in :mod:`._core`; :mod:`.transport` sends them (httpx on the sync face, a loop-shared aiohttp
session on the async face); every call repeats as :mod:`airflow_provider_llmbatch.retry` says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self, TypeVar

import httpx
from airflow.sdk import BaseHook

from airflow_provider_llmbatch.exceptions import VendorAPIError
from airflow_provider_llmbatch.hooks import transport
from airflow_provider_llmbatch.hooks._core import Core, M, Reply, Request
from airflow_provider_llmbatch.hooks.paging import Pager
from airflow_provider_llmbatch.hooks.settings import ConnSettings, settings_from_connection
from airflow_provider_llmbatch.models import Page
from airflow_provider_llmbatch.retry import NO_RETRY, RetryPolicy, classify
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

T = TypeVar("T")


class HookBase(BaseHook):
    """
    Read the connection once, hold the clients of both faces, and run calls under the retry policy.

    :param llmbatch_conn_id: the Airflow connection id (default: ``llmbatch_default``).
    :param timeout: seconds per call, overriding the connection's ``timeout`` extra.
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
        self._state: tuple[Core, RetryPolicy] | None = None
        self._client: httpx.Client | None = None
        self._lease: tuple[asyncio.AbstractEventLoop, str, transport.SharedSession] | None = None

    # -- the connection, read once (sync or async lookup) ---------------------------------------------

    def _use(self, conn: Any, extra: Mapping[str, Any]) -> ConnSettings:
        settings = settings_from_connection(
            self.conn_id,
            conn_type=conn.conn_type,
            host=conn.host,
            password=conn.password,
            extra=extra,
            port=conn.port,
            timeout=self._timeout,
        )
        policy = self._retry_policy or RetryPolicy().with_max_retries(settings.max_retries)
        self._state = (Core(settings), policy)
        return settings

    def _core(self) -> Core:
        if self._state is None:
            from airflow.sdk.log import mask_secret

            conn = self.get_connection(self.conn_id)
            for secret in self._use(conn, conn.extra_dejson).secret_values():
                mask_secret(secret)
        assert self._state is not None
        return self._state[0]

    async def _acore(self) -> Core:
        if self._state is None:
            from airflow.sdk.log import amask_secret

            conn = await BaseHook.aget_connection(self.conn_id)
            for secret in self._use(conn, await conn.aextra_dejson()).secret_values():
                await amask_secret(secret)
        assert self._state is not None
        return self._state[0]

    @property
    def vendor(self) -> VendorSpec:
        """Return the vendor spec of the connection (looked up synchronously on first use)."""
        return self._core().vendor

    @property
    def retry_policy(self) -> RetryPolicy:
        """Return the retry policy in force (after the connection is read)."""
        self._core()
        assert self._state is not None
        return self._state[1]

    # -- sync face ------------------------------------------------------------------------------------

    def get_conn(self) -> httpx.Client:
        """Return the hook's own ``httpx.Client`` (created on first use; closed by :meth:`close`)."""
        core = self._core()
        if self._client is None:
            self._client = transport.new_client(core.settings)
        return self._client

    def close(self) -> None:
        """Close the sync client."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _retrying(
        self,
        request: Request,
        once: Callable[[], T],
        *,
        recover: Callable[[], T | None] | None = None,
        on_repeat: tuple[type[VendorAPIError], Callable[[], T]] | None = None,
        can_repeat: Callable[[], bool] | None = None,
        retry: bool = True,
    ) -> T:
        """
        Run ``once`` under the retry policy.

        :param recover: before repeating a call that may have taken effect, look for what it made.
        :param on_repeat: an error that, on a repeat, means the first attempt did the job, and the
            answer to give then (a delete that finds the file gone).
        :param can_repeat: whether another attempt is possible at all.
        :param retry: False for one attempt only.
        """
        policy = self.retry_policy if retry else NO_RETRY
        idempotent = request.idempotent or recover is not None
        attempts = policy.attempts(request.operation, self.log, idempotent=idempotent, can_repeat=can_repeat)
        failure: VendorAPIError | None = None  # the last attempt's, when another follows
        while True:
            # Only a failure of unknown effect can have made something; one surely not sent is repeated.
            if failure is not None and recover is not None and classify(failure) == "unknown":
                try:
                    found = recover()
                except VendorAPIError as lookup:
                    # Whether the call took effect stays unknown, so it is not repeated blindly; the error
                    # raised is the call's own, not the look-up's.
                    self.log.warning(
                        "%s: the look-up for what it made failed (%s)", request.operation, lookup
                    )
                    raise failure from None
                if found is not None:
                    self.log.info("%s: found what the failed attempt made", request.operation)
                    return found
            try:
                return once()
            except VendorAPIError as exc:
                if failure is not None and on_repeat is not None and isinstance(exc, on_repeat[0]):
                    return on_repeat[1]()
                wait = attempts.failed(exc)
                if wait is None:
                    raise
                failure = exc
            policy.sleep(wait)

    def _call(self, request: Request, model: type[M], *, retry: bool = True) -> M:
        core = self._core()
        return self._retrying(
            request,
            lambda: core.parse(request, transport.send(self.get_conn(), core, request), model),
            retry=retry,
        )

    def _pages(self, kind: str, pager: Pager, model: type[M]) -> Iterator[list[M]]:
        core = self._core()
        while not pager.done:
            request = core.list_request(kind, pager.params())
            yield pager.feed(self._retrying(request, self._page_reader(core, request, model)))

    def _page_reader(self, core: Core, request: Request, model: type[M]) -> Callable[[], Page[M]]:
        return lambda: core.parse_page(request, transport.send(self.get_conn(), core, request), model)

    # -- files ------------------------------------------------------------------------------------------

    def _send(self, request: Request, content: Any, headers: Mapping[str, str]) -> Reply:
        return transport.send(self.get_conn(), self._core(), request, content, headers)

    # -- async face: one session per event loop and origin ---------------------------------------------

    async def _ashared(self) -> tuple[Core, transport.SharedSession]:
        core = await self._acore()
        loop = asyncio.get_running_loop()
        if self._lease is not None and self._lease[0] is not loop:
            # Used from another loop before (a second asyncio.run): that session cannot serve this one.
            stale, self._lease = self._lease, None
            await transport.release(stale[0], stale[1])
        if self._lease is None:
            origin = core.settings.origin
            shared = await transport.acquire(origin)
            if self._lease is None:
                self._lease = (loop, origin, shared)
            else:
                # Another task of this hook (the parts of one trigger) leased it meanwhile: one lease each.
                await transport.release(loop, origin)
        return core, self._lease[2]

    async def aslots(self) -> asyncio.Semaphore:
        """
        Return the connection slots of this loop's session for the connection's origin.

        A caller holding a slot never waits for a connection inside the HTTP library, so a poll timed
        from the moment it holds one is timed from when it is sent.
        """
        return (await self._ashared())[1].slots

    async def _acall(self, request: Request, model: type[M], *, retry: bool = True) -> M:
        core, shared = await self._ashared()
        policy = self.retry_policy if retry else NO_RETRY
        attempts = policy.attempts(request.operation, self.log)
        while True:
            try:
                return core.parse(request, await transport.asend(shared, core, request), model)
            except VendorAPIError as exc:
                wait = attempts.failed(exc)
                if wait is None:
                    raise
            await policy.asleep(wait)

    async def aclose(self) -> None:
        """Release the shared async session (it closes when its last user releases it) and the sync client."""
        lease, self._lease = self._lease, None
        if lease is not None:
            await transport.release(lease[0], lease[1])
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
