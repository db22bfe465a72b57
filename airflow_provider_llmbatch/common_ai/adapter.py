"""
Batch adapters for Airflow's AI provider (``@task.llm_batch``), one per vendor in the registry.

common-ai picks an adapter by the ``model_id`` prefix (``zhipu:glm-4-flash``) and checks the connection
type against the adapter's ``conn_types``; both come from the vendor's
:class:`~airflow_provider_llmbatch.vendors.VendorSpec`. Every call goes through
:class:`~airflow_provider_llmbatch.hooks.batch.BatchHook`'s sync face: its retry policy (a create or
upload of unknown effect is looked up, never blindly repeated), its error table and its secret hygiene.
common-ai's contract is synchronous; its trigger runs each call in a worker thread, never on the loop.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.common.ai.batch.base import (
    BatchAdapter,
    BatchState,
    ExtractedOutput,
    RawResultItem,
    SubmitResult,
)
from airflow.providers.common.ai.exceptions import (
    LLMBatchInputError,
    LLMBatchLimitExceededError,
    LLMBatchModelMismatchError,
)
from airflow.sdk.log import mask_secret

from airflow_provider_llmbatch import codec
from airflow_provider_llmbatch.common_ai import answers
from airflow_provider_llmbatch.common_ai.request_lines import (
    LineSettings,
    chat_endpoint,
    output_directive,
    write_request_file,
)
from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.hooks.arguments import check_create_args
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.uploads import upload_name
from airflow_provider_llmbatch.jsonl_lines import byte_limit, request_limit
from airflow_provider_llmbatch.models import Batch
from airflow_provider_llmbatch.operators.reattach import KEY_LENGTH, KEY_METADATA
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

if TYPE_CHECKING:
    from airflow.providers.common.ai.batch.base import BatchRequest
    from airflow.providers.common.ai.batch.output_schema import OutputSpec

log = logging.getLogger(__name__)

PREFIX_OVERRIDES: Mapping[str, str] = {"openai": "llmbatch"}
"""
Registry vendor name -> ``model_id`` prefix, where the vendor's own name is taken.

common-ai ships its own ``openai`` adapter and resolves that prefix to it before any entry point, so
the generic OpenAI-compatible vendor answers to ``llmbatch:<model>``.
"""

ORPHAN_CLOCK_SLACK = timedelta(minutes=5)
"""How much earlier than common-ai's intent record a batch may look created (clock skew, whole seconds)."""


def model_prefix(vendor: VendorSpec) -> str:
    """Return the ``model_id`` prefix that selects ``vendor``'s adapter (``zhipu`` in ``zhipu:glm-4``)."""
    return PREFIX_OVERRIDES.get(vendor.name, vendor.name)


def orphan_key(idempotency_key: str, input_fingerprint: str) -> str:
    """
    Return the ``llmbatch_key`` metadata value of a common-ai batch: its task instance and its input.

    The same metadata key the provider's own operators tag their batches with (see
    :mod:`~airflow_provider_llmbatch.operators.reattach`), so one look-up finds either kind; the value
    hashes common-ai's identity key and input fingerprint, so a batch of another input never matches.
    """
    material = f"common-ai\x1f{idempotency_key}\x1f{input_fingerprint}"
    return hashlib.sha256(material.encode()).hexdigest()[:KEY_LENGTH]


class _KeyedHook(BatchHook):
    """A :class:`BatchHook` built from a key and a base URL, which is all common-ai hands an adapter."""

    def __init__(self, vendor: VendorSpec, api_key: str | None, base_url: str | None) -> None:
        super().__init__(f"{vendor.conn_type} via common-ai")
        conn = SimpleNamespace(conn_type=vendor.conn_type, host=base_url, password=api_key, port=None)
        for secret in self._use(conn, {}).secret_values():
            mask_secret(secret)


class VendorBatchAdapter(BatchAdapter):
    """
    Run ``@task.llm_batch`` on one vendor's Batch API; subclasses name the vendor (``vendor``) only.

    :param api_key: the connection's password: the vendor's API key.
    :param base_url: the connection's host: the base URL (empty: the registry's default region).
    :param client: a :class:`BatchHook` to use instead (tests, or extras common-ai does not pass on).
    """

    vendor: ClassVar[VendorSpec]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("vendor")
        if spec is None:
            return
        endpoint = chat_endpoint(spec)
        cls.name = model_prefix(spec)
        cls.conn_types = frozenset({spec.conn_type})
        cls.max_requests = request_limit(spec, endpoint)
        cls.max_payload_bytes = byte_limit(spec, endpoint)
        # Doc, every vendor: one model per request file.
        cls.allows_per_request_model = False

    def __init__(
        self, *, api_key: str | None = None, base_url: str | None = None, client: Any | None = None
    ) -> None:
        try:
            hook = client if client is not None else _KeyedHook(self.vendor, api_key, base_url)
        except InvalidInputError as exc:
            raise LLMBatchInputError(str(exc)) from exc
        self._client = self.hook = hook

    # -- requests -----------------------------------------------------------------------------------

    def _settings(self, model: str, key16: str, output_spec: OutputSpec, **kwargs: Any) -> LineSettings:
        return LineSettings(
            vendor=self.vendor,
            model=model,
            key16=key16,
            system_prompt=kwargs.get("system_prompt") or "",
            max_tokens=kwargs.get("max_tokens") or 1024,
            request_params=kwargs.get("request_params"),
            output_spec=output_spec,
        )

    def _models(self, requests: list[BatchRequest], model: str) -> list[str]:
        """Return each request's bare model; refuse a foreign prefix or more than one model."""
        models = [
            self.resolve_request_model(r.get("model"), default_bare_model=model, request_index=i)
            for i, r in enumerate(requests)
        ]
        if len(set(models)) > 1:
            raise LLMBatchModelMismatchError(
                f"{self.vendor.display_name} takes one model per batch; this one names "
                f"{len(set(models))} ({sorted(set(models))!r}). Split the input by model."
            )
        return models

    def build_output_directive(self, spec: OutputSpec) -> dict[str, Any]:
        """Return the ``response_format`` that asks this vendor for ``spec`` (see ``request_lines``)."""
        return output_directive(self.vendor, spec)

    def validate_requests(
        self,
        requests: list[BatchRequest],
        *,
        model: str,
        output_spec: OutputSpec,
        idempotency_key: str,
        **kwargs: Any,
    ) -> None:
        """
        Refuse, before any call, a batch the vendor would refuse: every line built and checked.

        :raises LLMBatchLimitExceededError: over the vendor's request or byte limit of one file.
        :raises LLMBatchInputError: a line breaks a vendor rule (e.g. Moonshot's forbidden ``temperature``).
        """
        self.check_custom_id_length(idempotency_key, len(requests))
        name = self.vendor.display_name
        if len(requests) > self.max_requests:
            raise LLMBatchLimitExceededError(
                f"{name} takes at most {self.max_requests} requests per batch; got {len(requests)}. Split "
                f"the input with .expand() so each task instance submits at most {self.max_requests}."
            )
        settings = self._settings(model, idempotency_key, output_spec, **kwargs)
        models = self._models(requests, model)
        with tempfile.TemporaryDirectory(prefix="llmbatch-common-ai-") as folder:
            path = Path(folder) / "requests.jsonl"
            report = write_request_file(requests, settings, models, path, whole_input=True)
        if report.bytes > self.max_payload_bytes:
            raise LLMBatchLimitExceededError(
                f"{name} takes a request file of at most {self.max_payload_bytes} bytes; this batch "
                f"needs {report.bytes}. Split the input with .expand()."
            )

    def submit(
        self,
        requests: list[BatchRequest],
        *,
        model: str,
        idempotency_key: str,
        input_fingerprint: str,
        output_spec: OutputSpec,
        **kwargs: Any,
    ) -> SubmitResult:
        """
        Upload the checked request file and create the batch, tagged so a lost answer can be found again.

        The batch's metadata carries ``llmbatch_key`` (:func:`orphan_key`), which
        :meth:`find_orphaned_batch` looks up; the upload is named after the same key, so the provider's
        cleanup recognises it.
        """
        key = orphan_key(idempotency_key, input_fingerprint)
        endpoint = chat_endpoint(self.vendor).path
        window = kwargs.get("completion_window")
        metadata = {KEY_METADATA: key}
        try:
            check_create_args(self.vendor, endpoint=endpoint, completion_window=window, metadata=metadata)
        except InvalidInputError as exc:
            raise LLMBatchInputError(str(exc)) from exc
        settings = self._settings(model, idempotency_key, output_spec, **kwargs)
        models = self._models(requests, model)
        with tempfile.TemporaryDirectory(prefix="llmbatch-common-ai-") as folder:
            path = Path(folder) / "requests.jsonl"
            write_request_file(requests, settings, models, path)
            uploaded = self.hook.upload_file(path, filename=upload_name(key))
        batch = self.hook.create_batch(
            input_file_id=uploaded.id, endpoint=endpoint, completion_window=window, metadata=metadata
        )
        log.info("Created %s batch %s (%d requests)", self.vendor.display_name, batch.id, len(requests))
        return SubmitResult(batch_id=batch.id, provider_input_ref=uploaded.id)

    # -- batches ------------------------------------------------------------------------------------

    def get_batch(self, batch_id: str) -> BatchState:
        """Return the batch's status in common-ai's words; an unknown status is in progress."""
        return answers.batch_state(self.hook.get_batch(batch_id))

    def cancel_batch(self, batch_id: str) -> None:
        """Ask the vendor to cancel the batch (one that has already ended is left as it is)."""
        self.hook.cancel_batch(batch_id)

    def find_orphaned_batch(
        self, idempotency_key: str, input_fingerprint: str, not_before: str
    ) -> str | None:
        """
        Return the newest batch tagged with this task instance's key for this input, created since the intent.

        A look-up that fails raises (common-ai then treats the batch as unknown, not absent).
        """
        batch = self.hook.find_batch(metadata={KEY_METADATA: orphan_key(idempotency_key, input_fingerprint)})
        if batch is None:
            return None
        if not_before and batch.created_at is not None:
            intent = datetime.fromisoformat(not_before)
            intent = intent if intent.tzinfo else intent.replace(tzinfo=UTC)
            if batch.created_at < intent - ORPHAN_CLOCK_SLACK:
                return None
        return batch.id

    # -- results ------------------------------------------------------------------------------------

    def iter_results(self, batch_id: str) -> Iterator[RawResultItem]:
        """Return an iterator over the lines of the output file, then the error file, downloaded first."""
        batch = self.hook.get_batch(batch_id)
        return self._results(batch)

    def _results(self, batch: Batch) -> Iterator[RawResultItem]:
        with tempfile.TemporaryDirectory(prefix="llmbatch-common-ai-") as folder:
            for file_id in (batch.output_file_id, batch.error_file_id):
                if not file_id:
                    continue
                path = Path(folder) / "lines.jsonl"
                # The listed size lets the download refuse a garbled body that would land as the file.
                self.hook.download_file(file_id, path, expected_bytes=self.hook.get_file(file_id).bytes)
                with path.open("rb") as handle:
                    for number, raw in enumerate(handle, start=1):
                        if raw.isspace():
                            continue
                        try:
                            data = codec.parse_vendor_object(raw)
                            yield answers.result_item(data)
                        except (ValueError, RecursionError) as exc:
                            # The vendor sends the same line on every try: skipping it lets the rest land,
                            # and common-ai counts its request as missing.
                            log.warning(
                                "Skipping line %d of file %s of batch %s: %s", number, file_id, batch.id, exc
                            )

    def extract_output(self, raw: RawResultItem, spec: OutputSpec) -> ExtractedOutput:
        """Return the answer as text, or as JSON text to validate when ``spec`` is structured."""
        return answers.extract(raw, spec)

    def close(self) -> None:
        """Close the hook's HTTP client."""
        self.hook.close()


class ZhipuBatchAdapter(VendorBatchAdapter):
    """Run ``@task.llm_batch`` on Zhipu BigModel (GLM): ``zhipu:<model>``, connection ``llmbatch_zhipu``."""

    vendor = REGISTRY["zhipu"]


class MoonshotBatchAdapter(VendorBatchAdapter):
    """Run ``@task.llm_batch`` on Moonshot (Kimi): ``moonshot:<model>``, connection ``llmbatch_moonshot``."""

    vendor = REGISTRY["moonshot"]


class DashScopeBatchAdapter(VendorBatchAdapter):
    """Run ``@task.llm_batch`` on DashScope: ``dashscope:<model>``, connection ``llmbatch_dashscope``."""

    vendor = REGISTRY["dashscope"]


class OpenAICompatibleBatchAdapter(VendorBatchAdapter):
    """Run ``@task.llm_batch`` on an OpenAI-compatible API: ``llmbatch:<model>``, ``llmbatch_openai``."""

    vendor = REGISTRY["openai"]


ADAPTERS: Mapping[str, type[VendorBatchAdapter]] = {
    cls.vendor.name: cls
    for cls in (ZhipuBatchAdapter, MoonshotBatchAdapter, DashScopeBatchAdapter, OpenAICompatibleBatchAdapter)
}
"""Registry vendor name -> its adapter class."""
