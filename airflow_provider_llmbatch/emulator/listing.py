"""List endpoints: the filters and paging a vendor's ``ListSpec`` and ``PageShape`` declare, nothing else."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from airflow_provider_llmbatch.emulator.errors import ApiError
from airflow_provider_llmbatch.emulator.records import BatchRecord, FileRecord
from airflow_provider_llmbatch.emulator.vendor_dialects import PageShape
from airflow_provider_llmbatch.vendors import ListSpec

_MAX_FILE_IDS = 20


class _HasId(Protocol):
    id: str


T = TypeVar("T", bound=_HasId)


def _param(list_spec: ListSpec, query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    return value if name in list_spec.params and value not in (None, "") else None


def _instant(list_spec: ListSpec, query: Mapping[str, str], name: str) -> float | None:
    """Return a time filter as epoch seconds, read in the list's format and zone (DashScope: Beijing time)."""
    value = _param(list_spec, query, name) if name in list_spec.time_params else None
    if value is None:
        return None
    parsed = list_spec.parse_time(value)
    if parsed is None:
        example = list_spec.time_example()
        raise ApiError("bad_request", f"expected {name} like {example}, got {value!r}", param=name)
    return parsed.timestamp()


def _creation_range(list_spec: ListSpec, query: Mapping[str, str]) -> tuple[float, float]:
    """Return ``[start, end)`` of the creation filters; a malformed one is refused even for an empty list."""
    after = _instant(list_spec, query, "create_after")
    before = _instant(list_spec, query, "create_before")
    # The filters are read to the second: a creation within the named second is inside the range.
    return (after if after is not None else float("-inf"), before + 1 if before is not None else float("inf"))


def filter_files(
    list_spec: ListSpec, files: Sequence[FileRecord], query: Mapping[str, str]
) -> list[FileRecord]:
    """Apply the file filters the list accepts (``purpose``, ``order``, creation range)."""
    purpose = _param(list_spec, query, "purpose")
    start, end = _creation_range(list_spec, query)
    result = [f for f in files if (purpose is None or f.purpose == purpose) and start <= f.created_at < end]
    order = _param(list_spec, query, "order")
    if order not in (None, "asc", "desc"):
        raise ApiError("bad_request", f"expected order 'asc' or 'desc', got {order!r}", param="order")
    return list(reversed(result)) if order == "asc" else result


def filter_batches(
    list_spec: ListSpec, batches: Sequence[BatchRecord], query: Mapping[str, str]
) -> list[BatchRecord]:
    """Apply the batch filters the list accepts (name, input files, statuses, creation range)."""
    name = _param(list_spec, query, "ds_name")
    file_ids_raw = _param(list_spec, query, "input_file_ids")
    file_ids = {f.strip() for f in file_ids_raw.split(",") if f.strip()} if file_ids_raw else None
    if file_ids is not None and len(file_ids) > _MAX_FILE_IDS:
        message = f"expected at most {_MAX_FILE_IDS} input_file_ids, got {len(file_ids)}"
        raise ApiError("bad_request", message, param="input_file_ids")
    statuses_raw = _param(list_spec, query, "status")
    statuses = {s.strip() for s in statuses_raw.split(",") if s.strip()} if statuses_raw else None
    start, end = _creation_range(list_spec, query)
    result = []
    for batch in batches:
        if name is not None and name not in (batch.metadata or {}).get("ds_name", ""):
            continue
        if file_ids is not None and batch.input_file_id not in file_ids:
            continue
        if statuses is not None and batch.status not in statuses:
            continue
        if start <= batch.created_at < end:
            result.append(batch)
    return result


def paginate(
    list_spec: ListSpec, shape: PageShape, items: Sequence[T], query: Mapping[str, str]
) -> tuple[list[T], bool]:
    """Return one page after the ``after`` cursor, and whether more follow."""
    start = 0
    after = _param(list_spec, query, "after") if shape.honours_after else None
    if after is not None:
        ids = [item.id for item in items]
        # An unknown cursor gives an empty last page: every pager stops on it.
        start = ids.index(after) + 1 if after in ids else len(items)
    if list_spec.max_limit is None or "limit" not in list_spec.params:
        return list(items[start:]), False
    raw = query.get("limit")
    limit = shape.default_limit or list_spec.max_limit
    if raw not in (None, ""):
        try:
            limit = int(str(raw))
        except ValueError:
            raise ApiError("bad_request", f"expected an integer limit, got {raw!r}", param="limit") from None
    if not 1 <= limit <= list_spec.max_limit:
        message = f"expected limit from 1 to {list_spec.max_limit}, got {limit}"
        raise ApiError("bad_request", message, param="limit")
    page = list(items[start : start + limit])
    return page, start + limit < len(items)
