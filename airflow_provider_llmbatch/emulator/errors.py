"""The error a handler raises to answer in the vendor's dialect."""

from __future__ import annotations

from airflow_provider_llmbatch.emulator.records import Problem
from airflow_provider_llmbatch.vendors import ErrorKind


class ApiError(Exception):
    """
    Raise inside a handler to answer with an error in the vendor's dialect.

    :param kind: the error kind (the vendor's spec gives status and code).
    :param message: what went wrong.
    :param param: the request field at fault.
    :param status: an HTTP status other than the kind's.
    """

    def __init__(self, kind: ErrorKind, message: str, *, param: str | None = None, status: int | None = None):
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.param = param
        self.status = status


def problem_error(problem: Problem) -> ApiError:
    """Return the API error for a request-file problem found at upload or create."""
    where = f"line {problem.line}: " if problem.line is not None else ""
    kind: ErrorKind = "file_too_large" if problem.code == "file_too_large" else "bad_request"
    return ApiError(kind, f"{where}{problem.message}", param=problem.param)
