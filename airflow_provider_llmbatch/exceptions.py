"""
The provider's exceptions, under one root.

::

    LLMBatchError (AirflowException)
    ├── InvalidInputError                  found before anything is spent
    │   └── InvalidRequestFileError        a request file breaks the vendor's rules
    ├── VendorAPIError                     the vendor's API answered with an error, or not at all
    │   ├── BadRequestError                400/422: the request was wrong
    │   │   └── FileTooLargeError          the vendor refused the file for its size
    │   ├── AuthenticationError            401: the key is missing, wrong or expired
    │   ├── PermissionDeniedError          403 (Zhipu 434): the key may not do this
    │   ├── NotFoundError                  404: no such batch or file
    │   ├── ConflictError                  409, or the vendor's "not in that state" answer
    │   ├── RateLimitError                 429 with a rate code: retry later
    │   ├── QuotaExceededError             429 with an arrears/quota code: retrying will not help
    │   ├── ServerError                    5xx
    │   ├── APIConnectionError             no response: connect error, reset, timeout
    │   │   └── APITimeoutError            the response did not come in time
    │   └── MalformedResponseError         a 2xx whose body is not what the API promises
    │       └── WrongObjectError           ... about another batch or file than the one asked for
    └── BatchOutcomeError                  the batch ended, and not well
        ├── BatchFailedError               status failed (validation errors attached)
        ├── BatchExpiredError              status expired: the window ran out
        ├── BatchCancelledError            status cancelled
        ├── BatchTimeoutError              our own deadline passed before a terminal status
        └── TooManyFailedRequestsError     completed, but more requests failed than allowed

Constructors never do I/O. Messages name the vendor, the connection, the HTTP status, the vendor's
error code and request id; never the API key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from airflow.sdk.exceptions import AirflowException

Effect = Literal["not_sent", "unknown"]
"""Whether a failed call surely did nothing at the vendor (``not_sent``) or may have acted (``unknown``)."""


class LLMBatchError(AirflowException):
    """Raise when anything in this provider fails; the root of the hierarchy."""


class InvalidInputError(LLMBatchError, ValueError):
    """Raise when arguments or inputs are wrong, before anything is uploaded or paid for."""


class InputChangedError(InvalidInputError):
    """
    Raise when a local input changed (or went) after it was checked: nothing is sent from the changed file.

    A split input's parts are spans of the local input file, sent from it; a file that is no longer the
    one checked is refused at every read.
    """


class InvalidRequestFileError(InvalidInputError):
    """
    Raise when a request file breaks the vendor's rules.

    :param source: the file's name or URI.
    :param problems: one readable line per problem, each naming the line, field and expectation.
    :param truncated: how many further problems were found but not listed.
    """

    def __init__(self, source: str, problems: Sequence[str], truncated: int = 0) -> None:
        self.source = source
        self.problems = list(problems)
        self.truncated = truncated
        more = f"\n  ... and {truncated} more" if truncated else ""
        listing = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems) + truncated
        super().__init__(f"{source}: {count} problem(s) in the request file:\n{listing}{more}")


class VendorAPIError(LLMBatchError):
    """
    Raise when a vendor's API answers with an error, or does not answer.

    :param message: what went wrong, in words.
    :param vendor: the vendor's registry name.
    :param conn_id: the Airflow connection used.
    :param operation: the hook operation, e.g. ``create_batch``.
    :param status_code: the HTTP status, if a response came.
    :param code: the vendor's error code or type, if given.
    :param request_id: the vendor's request id, if given.
    :param retry_after: seconds the vendor asked us to wait, if it did.
    """

    def __init__(
        self,
        message: str,
        *,
        vendor: str = "",
        conn_id: str = "",
        operation: str = "",
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.vendor = vendor
        self.conn_id = conn_id
        self.operation = operation
        # AirflowException's class attribute is an HTTPStatus for the API server; ours is the vendor's.
        self.status_code = status_code  # type: ignore[assignment]
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        self.vendor_message = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ", ".join(
            part
            for part in (
                f"vendor={self.vendor}" if self.vendor else "",
                f"conn_id={self.conn_id}" if self.conn_id else "",
                f"operation={self.operation}" if self.operation else "",
                f"http_status={self.status_code}" if self.status_code is not None else "",
                f"code={self.code}" if self.code else "",
                f"request_id={self.request_id}" if self.request_id else "",
            )
            if part
        )
        return f"{type(self).__name__}: {self.vendor_message} ({where})" if where else self.vendor_message

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {
            "vendor": self.vendor,
            "conn_id": self.conn_id,
            "operation": self.operation,
            "status_code": self.status_code,
            "code": self.code,
            "request_id": self.request_id,
            "retry_after": self.retry_after,
        }
        return (_rebuild_api_error, (type(self), self.vendor_message, kwargs))


def _rebuild_api_error(cls: type[VendorAPIError], message: str, kwargs: Mapping[str, Any]) -> VendorAPIError:
    return cls(message, **kwargs)


class BadRequestError(VendorAPIError):
    """Raise when the vendor rejects a request as malformed (400/422)."""


class FileTooLargeError(BadRequestError):
    """Raise when the vendor refuses a file for its size."""


class AuthenticationError(VendorAPIError):
    """Raise when the vendor rejects the API key (401)."""


class PermissionDeniedError(VendorAPIError):
    """Raise when the key may not perform the operation (403; Zhipu 434)."""


class NotFoundError(VendorAPIError):
    """Raise when the batch or file does not exist (404)."""


class ConflictError(VendorAPIError):
    """Raise when the resource is not in a state that allows the operation (409; cancel of an ended batch)."""


class RateLimitError(VendorAPIError):
    """Raise when the vendor throttles us (429 with a rate code); safe to retry after a wait."""


class QuotaExceededError(VendorAPIError):
    """Raise when the account is out of quota or in arrears (429 with a quota code); retrying won't help."""


class ServerError(VendorAPIError):
    """Raise when the vendor fails on its side (5xx)."""


class APIConnectionError(VendorAPIError):
    """
    Raise when no (complete) response came: connect error, reset connection, broken body.

    :param effect: ``not_sent`` when the request never left, ``unknown`` when the vendor may have acted
        on it, None when repeating it cannot help.
    """

    def __init__(self, message: str, *, effect: Effect | None = "unknown", **kwargs: Any) -> None:
        self.effect = effect
        super().__init__(message, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, (cls, message, kwargs) = super().__reduce__()
        return (rebuild, (cls, message, {**kwargs, "effect": self.effect}))


class APITimeoutError(APIConnectionError):
    """Raise when a response did not come in time."""


class MalformedResponseError(VendorAPIError):
    """Raise when a successful response's body is not what the API promises (not JSON, wrong shape)."""


class WrongObjectError(MalformedResponseError):
    """Raise when the answer is about another object than the one asked for (a cache or routing fault)."""


class BatchOutcomeError(LLMBatchError):
    """
    Raise when a batch reached an end that is not success.

    :param message: what happened, in words.
    :param batch_id: the vendor's batch id.
    :param status: the batch's final status (or ``timeout``).
    :param summary: the batch summary (JSON primitives) for logs and XCom.
    """

    def __init__(self, message: str, *, batch_id: str, status: str, summary: Mapping[str, Any] | None = None):
        self.batch_id = batch_id
        self.status = status
        self.summary = dict(summary or {})
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_outcome_error, (type(self), str(self), self.batch_id, self.status, self.summary))


def _rebuild_outcome_error(
    cls: type[BatchOutcomeError], message: str, batch_id: str, status: str, summary: Mapping[str, Any]
) -> BatchOutcomeError:
    return cls(message, batch_id=batch_id, status=status, summary=summary)


class BatchFailedError(BatchOutcomeError):
    """Raise when a batch ends ``failed`` (usually validation); the vendor's errors are in the message."""


class BatchExpiredError(BatchOutcomeError):
    """Raise when a batch ends ``expired``: the completion window ran out."""


class BatchCancelledError(BatchOutcomeError):
    """Raise when a batch ends ``cancelled``."""


class BatchTimeoutError(BatchOutcomeError):
    """Raise when our own deadline passes before the batch reaches a terminal status."""


class TooManyFailedRequestsError(BatchOutcomeError):
    """Raise when a batch completed but its failed share exceeds ``max_failed_fraction``."""
