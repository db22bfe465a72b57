"""
``@task.llmbatch``: a function returns the job's input; the task runs the whole batch job.

Registered through the provider's ``task-decorators``, so ``from airflow.sdk import task`` users write::

    @task.llmbatch(conn_id="llmbatch_zhipu", model="glm-4-flash", output_schema=Review)
    def reviews() -> list[dict]:
        return [{"custom_id": r["id"], "prompt": r["text"]} for r in load_reviews()]

The function returns records (any form ``CreateBatchOperator``'s ``requests=`` takes) or the path or URI
of a request file; the task is a :class:`~airflow_provider_llmbatch.operators.run.RunBatchOperator` and
returns its manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import ObjectStoragePath
from airflow.sdk.bases.decorator import DecoratedOperator, TaskDecorator, task_decorator_factory
from airflow.sdk.definitions._internal.types import SET_DURING_EXECUTION
from airflow.sdk.definitions.context import context_merge

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.operators.run import RunBatchOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class _LLMBatchDecoratedOperator(DecoratedOperator, RunBatchOperator):  # type: ignore[misc]
    """
    Call the function for the job's input, then run the job as :class:`RunBatchOperator` does.

    The function runs again on a retry or a clear and must return the same input then: the input's
    fingerprint is part of the identity a retry re-attaches by (a changed input is a new job, paid anew).
    What it returns is not rendered as a template; the operator's other templated arguments are.

    :param python_callable: the function returning records, or a request file's path or URI.
    :param op_args: positional arguments of the function.
    :param op_kwargs: keyword arguments of the function.
    """

    template_fields: Sequence[str] = tuple(
        dict.fromkeys(
            f
            for f in (*DecoratedOperator.template_fields, *RunBatchOperator.template_fields)
            if f not in ("requests", "input_file")
        )
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        **DecoratedOperator.template_fields_renderers,
        **RunBatchOperator.template_fields_renderers,
    }
    custom_operator_name: str = "@task.llmbatch"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("requests", "input_file"):
            if kwargs.get(name) is not None:
                raise InvalidInputError(f"@task.llmbatch takes its input from the function; drop {name}=")
        super().__init__(
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            requests=SET_DURING_EXECUTION,
            **kwargs,
        )

    def execute(self, context: Context) -> dict[str, Any]:
        """Call the function for the input; run the job; return the manifest."""
        context_merge(context, self.op_kwargs)
        value = self.python_callable(*self.op_args, **self.determine_kwargs(context))
        self.input_file, self.requests = _as_input(value)
        return RunBatchOperator.execute(self, context)


def _as_input(value: Any) -> tuple[Any, Any]:
    """Return ``(input_file, requests)`` for what the function returned."""
    if isinstance(value, str | os.PathLike | ObjectStoragePath):
        return value, None
    if value is None or isinstance(value, bytes | Mapping) or not isinstance(value, Iterable):
        raise InvalidInputError(
            "the @task.llmbatch function must return records (a list) or a request file's path or URI, "
            f"got {type(value).__name__}"
        )
    return None, value if isinstance(value, Sequence) else list(value)


def llmbatch_task(python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> TaskDecorator:
    """
    Wrap a function returning a batch job's input into a task that runs the whole job.

    Takes every argument of :class:`~airflow_provider_llmbatch.operators.run.RunBatchOperator` (the
    create's and the fetch's: ``conn_id``, ``model``, ``output_schema``, ``max_cost``, ``prices``,
    ``format``, ``resubmit_failed``, ...), works with ``.partial()`` / ``.expand()``, and returns the
    manifest.

    :param python_callable: the function to wrap.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        decorated_operator_class=_LLMBatchDecoratedOperator,
        **kwargs,
    )
