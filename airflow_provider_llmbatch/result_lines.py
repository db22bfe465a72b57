"""
Lines of output and error files, read leniently in every vendor's shape.

:class:`ResultLine` is the model of a line; :func:`read_result_line` reads a parsed line by the same
rules without building the models, for the results join, which reads every line of a batch's output.
Both end in one function that judges the line, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

from pydantic import BeforeValidator

from airflow_provider_llmbatch.models import LenientModel, OptInt, OptStr, optional_int, optional_str


def _dict_or_none(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _result_error(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value
    if isinstance(value, str) and value:
        return {"message": value}
    return None


def _result_response(value: Any) -> Any:
    return value if isinstance(value, Mapping) else None


class ResultResponse(LenientModel):
    """The ``response`` of an output line."""

    status_code: OptInt = None
    request_id: OptStr = None
    body: Annotated[dict[str, Any] | None, BeforeValidator(_dict_or_none)] = None


class ResultError(LenientModel):
    """The ``error`` of an error line."""

    code: OptStr = None
    message: OptStr = None


class ResultOutcome(NamedTuple):
    """
    What one output or error line says about its request: what :class:`ResultLine` reads, in one call.

    :param succeeded: the request got a 2xx response and no error (:attr:`ResultLine.succeeded`).
    :param error_code: :attr:`ResultLine.error_code`.
    :param error_message: :attr:`ResultLine.error_message`.
    :param has_response: the line has a ``response`` object (a request that never ran has none).
    :param body: the response body, or None (:attr:`ResultResponse.body`).
    :param usage: :attr:`ResultLine.usage`.
    """

    succeeded: bool
    error_code: str | None
    error_message: str | None
    has_response: bool
    body: dict[str, Any] | None
    usage: dict[str, int]


class ResultLine(LenientModel):
    """One line of an output or error file, in any vendor's shape."""

    id: OptStr = None
    custom_id: OptStr = None
    response: Annotated[ResultResponse | None, BeforeValidator(_result_response)] = None
    error: Annotated[ResultError | None, BeforeValidator(_result_error)] = None

    @property
    def succeeded(self) -> bool:
        """Return True when the request got a 2xx response and no error."""
        return self._outcome().succeeded

    @property
    def error_code(self) -> str | None:
        """Return the error code from ``error`` or from the response body's ``error``."""
        return self._outcome().error_code

    @property
    def error_message(self) -> str | None:
        """Return the error message from ``error`` or from the response body's ``error``."""
        return self._outcome().error_message

    @property
    def usage(self) -> dict[str, int]:
        """Return the token usage of a successful response (empty when absent)."""
        return self._outcome().usage

    def _outcome(self) -> ResultOutcome:
        error, response = self.error, self.response
        return _judge(
            error.code if error else None,
            error.message if error else None,
            response.status_code if response is not None else None,
            response is not None,
            response.body if response is not None else None,
        )


def read_result_line(data: Mapping[str, Any]) -> ResultOutcome:
    """
    Read a parsed output or error line as :class:`ResultLine` does, without building the models.

    The same rules as ``ResultLine.model_validate(data)`` and its properties, for the results join,
    which reads every line of a batch's output: a body that is already a dict is used as it is.

    :param data: one line of an output or error file, parsed from JSON.
    """
    response = data.get("response")
    if type(response) is not dict:
        response = _result_response(response)
    error = data.get("error")
    if error is not None and type(error) is not dict:
        error = _result_error(error)
    status_code: int | None = None
    body: dict[str, Any] | None = None
    if response is not None:
        status_code = response.get("status_code")
        if type(status_code) is not int:
            status_code = optional_int(status_code)
        raw_body = response.get("body")
        body = raw_body if type(raw_body) is dict else _dict_or_none(raw_body)
    code = message = None
    if error is not None:
        code = optional_str(error.get("code"))
        message = optional_str(error.get("message"))
    return _judge(code, message, status_code, response is not None, body)


def _judge(
    code: str | None,
    message: str | None,
    status_code: int | None,
    has_response: bool,
    body: dict[str, Any] | None,
) -> ResultOutcome:
    """Return what a line says, from its error's code and message and its response's status and body."""
    succeeded = not (code or message) and status_code is not None and 200 <= status_code < 300
    body_error = body.get("error") if body else None
    if body_error is not None and not (type(body_error) is dict or isinstance(body_error, Mapping)):
        body_error = None
    if not code and body_error:
        code = optional_str(body_error.get("code") or body_error.get("type"))
    if not message:
        if body_error:
            message = optional_str(body_error.get("message"))
        elif has_response and not succeeded:
            message = f"HTTP {status_code}"
    usage = body.get("usage") if body else None
    if usage is None or not (type(usage) is dict or isinstance(usage, Mapping)):
        usage = {}
    else:
        usage = {
            str(k): v
            for k, v in usage.items()
            if type(v) is int or (isinstance(v, int) and not isinstance(v, bool))
        }
    return ResultOutcome(succeeded, code, message, has_response, body, usage)
