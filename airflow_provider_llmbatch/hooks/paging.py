"""
Paging a vendor's list endpoint: the pager that always ends, and the filters as the vendor reads them.

What a list accepts (parameters, the largest page, time filters and how they are written) is the
registry's :class:`~airflow_provider_llmbatch.vendors.ListSpec`; nothing here names a vendor.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

from airflow_provider_llmbatch.exceptions import InvalidInputError
from airflow_provider_llmbatch.models import Batch, FileObject, Page
from airflow_provider_llmbatch.vendors import ListSpec, VendorSpec

M = TypeVar("M", Batch, FileObject)


class Pager:
    """
    The state of one paged listing; ends on ``has_more`` false or absent, a stuck cursor or a repeated page.

    :param spec: how the vendor's list endpoint pages.
    :param filters: query parameters besides ``after``/``limit``.
    :param page_size: the requested page size; above the vendor's maximum it is refused, never capped.
    :param after: the cursor to start after, if any.
    """

    def __init__(
        self, spec: ListSpec, filters: Mapping[str, str], page_size: int | None, after: str | None = None
    ) -> None:
        self._spec = spec
        self._filters = dict(filters)
        self._limit = None
        if page_size is not None and spec.max_limit is not None and "limit" in spec.params:
            if page_size > spec.max_limit:
                raise InvalidInputError(f"page_size: at most {spec.max_limit} a page, got {page_size}")
            self._limit = page_size
        self._cursor: str | None = after
        self._seen: set[str] = set()
        self.done = False
        self.pages = 0

    def params(self) -> dict[str, str]:
        """Return the query parameters of the next page."""
        params = dict(self._filters)
        if self._limit is not None:
            params["limit"] = str(self._limit)
        if self._cursor is not None and "after" in self._spec.params:
            params["after"] = self._cursor
        return params

    def feed(self, page: Page[M]) -> list[M]:
        """Return the items of ``page`` not seen before, and decide whether another page follows."""
        self.pages += 1
        fresh = [item for item in page.data if item.id not in self._seen]
        self._seen.update(item.id for item in fresh)
        cursor = page.last_id or (page.data[-1].id if page.data else None)
        # A vendor that ignores `after` repeats itself; one without has_more never says stop.
        stuck = cursor is None or cursor == self._cursor or "after" not in self._spec.params
        if not page.has_more or not fresh or stuck:
            self.done = True
        self._cursor = cursor
        return fresh


def filter_value(vendor: VendorSpec, spec: ListSpec, name: str, value: Any) -> str:
    """Return a filter's value as the query sends it; a time is checked and written as the vendor reads it."""
    if name in spec.time_params:
        return _time_filter(vendor, spec, name, value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    return str(value)


def _time_filter(vendor: VendorSpec, spec: ListSpec, name: str, value: Any) -> str:
    """
    Return a point in time as the vendor's list filter writes it (``spec.time_format`` at ``spec.time_zone``).

    An aware datetime is converted to the vendor's zone; a naive one is refused (which zone it meant is a
    guess we do not make); text is checked against the format, so a bad value costs no request.
    """
    expected = f"an aware datetime, or text like {spec.time_example()} (UTC{spec.time_zone:+g})"
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise InvalidInputError(
                f"{name}: {vendor.display_name} reads it at UTC{spec.time_zone:+g}; give an aware datetime, "
                f"got a naive one ({value.isoformat()})"
            )
        try:
            text = value.astimezone(spec.tzinfo).strftime(spec.time_format)
        except (OverflowError, ValueError):  # beyond datetime's range once moved to the vendor's zone
            text = ""
        # A year before 1000 is written with fewer digits: text the vendor would refuse is never sent.
        if spec.parse_time(text) is None:
            raise InvalidInputError(
                f"{name}: expected a time in the years 1000 to 9999 at UTC{spec.time_zone:+g} (written like "
                f"{spec.time_example()}), got {value.isoformat()}"
            )
        return text
    if isinstance(value, str):
        if spec.parse_time(value) is None:
            raise InvalidInputError(f"{name}: expected {expected}, got {value!r}")
        return value
    raise InvalidInputError(f"{name}: expected {expected}, got {type(value).__name__}")
