"""
The vendors as their documents describe them: list filters and paging, counts, error codes, consoles.

Each fact is checked twice where it can be: on the registry and the hook (unit), and over loopback
against the emulator, which reads the same registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.emulator.config import EmulatorConfig
from airflow_provider_llmbatch.emulator.dialects import error_payload
from airflow_provider_llmbatch.emulator.testing import VendorClient, assert_error_body
from airflow_provider_llmbatch.emulator.vendor_dialects import dialect_of
from airflow_provider_llmbatch.exceptions import (
    AuthenticationError,
    BadRequestError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    VendorAPIError,
)
from airflow_provider_llmbatch.hooks import errors
from airflow_provider_llmbatch.hooks._core import Core
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.hooks.paging import Pager
from airflow_provider_llmbatch.hooks.settings import connection_region, settings_from_connection
from airflow_provider_llmbatch.links import batch as link_module
from airflow_provider_llmbatch.links.batch import BatchConsoleLink, console_url
from airflow_provider_llmbatch.vendors import REGISTRY, VendorSpec

VENDORS = list(REGISTRY.values())
DASHSCOPE = REGISTRY["dashscope"]
BEIJING = timezone(timedelta(hours=8))
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


@pytest.fixture
def fixed_emulator() -> Iterator[Emulator]:
    """An emulator of its own whose clock stands still until the test moves it."""
    with Emulator(EmulatorConfig(time_scale=1000.0), clock=lambda: T0) as emulator:
        yield emulator


@pytest.fixture
def hook_for(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Emulator, str], BatchHook]]:
    made: list[BatchHook] = []

    def _hook(emulator: Emulator, vendor: str) -> BatchHook:
        conn_id = f"fidelity_{vendor}"
        for key, value in emulator.airflow_conn_env(vendor, conn_id).items():
            monkeypatch.setenv(key, value)
        hook = BatchHook(conn_id)
        made.append(hook)
        return hook

    yield _hook
    for hook in made:
        hook.close()


def _list_requests(emulator: Emulator, vendor: str, what: str = "batches") -> int:
    return int(emulator.stats(vendor)["operations"].get(f"list_{what}", 0))


# -- 1. DashScope's creation-time filters ------------------------------------------------------------


def test_the_registry_holds_dashscope_time_format_and_zone() -> None:
    for list_spec in (DASHSCOPE.batch_list, DASHSCOPE.file_list):
        assert list_spec.time_params == {"create_after", "create_before"}
        assert list_spec.time_format == "%Y%m%d%H%M%S"
        assert list_spec.time_zone == 8.0
        assert list_spec.time_example() == "20260131080000"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (datetime(2026, 1, 31, 0, 0, 5, tzinfo=UTC), "20260131080005"),
        (datetime(2026, 1, 31, 8, 0, 5, tzinfo=BEIJING), "20260131080005"),
        (datetime(2026, 1, 30, 19, 0, 5, tzinfo=timezone(timedelta(hours=-5))), "20260131080005"),
        ("20260131080005", "20260131080005"),
    ],
    ids=["utc", "beijing", "utc-5", "text"],
)
def test_an_aware_datetime_is_sent_in_beijing_time(value: Any, sent: str) -> None:
    core = _core(DASHSCOPE)
    assert core.batch_pager(None, {"create_after": value}).params()["create_after"] == sent
    assert core.file_pager(None, None, {"create_before": value}).params()["create_before"] == sent


def test_a_naive_datetime_is_refused_naming_the_zone() -> None:
    with pytest.raises(InvalidInputError, match=r"create_before: .*UTC\+8.*naive"):
        _core(DASHSCOPE).batch_pager(None, {"create_before": datetime(2026, 1, 31, 8, 0)})


@pytest.mark.parametrize(
    "value",
    # strptime reads " 1" and "1" as "01": text of the right length is still not the vendor's format.
    [
        "2026-01-31 08:00:00",
        "2026013108000",
        "202601310800005",
        "2026131080000",
        "202601 1080000",
        "２０２６０１３１０８００００",
    ],
)
def test_a_bad_time_text_is_refused_before_any_request(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], value: str
) -> None:
    hook = hook_for(fixed_emulator, "dashscope")
    with pytest.raises(InvalidInputError, match=r"create_after: expected .*20260131080000"):
        list(hook.list_batches(create_after=value))
    with pytest.raises(InvalidInputError, match="create_before"):
        list(hook.list_files(create_before=value))
    assert _list_requests(fixed_emulator, "dashscope") == 0
    assert _list_requests(fixed_emulator, "dashscope", "files") == 0


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        # 01:30 happens twice in New York on 1 November 2026: EDT (fold 0), then EST (fold 1).
        (datetime(2026, 11, 1, 1, 30, tzinfo=ZoneInfo("America/New_York")), "20261101133000"),
        (datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")), "20261101143000"),
    ],
    ids=["edt", "est"],
)
def test_a_datetime_in_a_dst_fold_is_sent_as_the_instant_it_names(value: datetime, sent: str) -> None:
    assert _core(DASHSCOPE).batch_pager(None, {"create_after": value}).params()["create_after"] == sent


@pytest.mark.parametrize(
    "value",
    [datetime(999, 12, 31, tzinfo=UTC), datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)],
    ids=["year-999", "max", "min"],
)
def test_a_datetime_the_format_cannot_write_is_refused_before_any_request(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], value: datetime
) -> None:
    hook = hook_for(fixed_emulator, "dashscope")
    with pytest.raises(InvalidInputError, match=r"create_before: expected a time in the years 1000 to 9999"):
        list(hook.list_batches(create_before=value))
    assert _list_requests(fixed_emulator, "dashscope") == 0


def test_the_emulator_filters_by_creation_time_read_in_beijing(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook]
) -> None:
    client = VendorClient(fixed_emulator, DASHSCOPE)
    try:
        early = client.batch_from(["a"])["id"]
        fixed_emulator.advance_clock(3600)
        late = client.batch_from(["b"])["id"]
    finally:
        client.close()
    hook = hook_for(fixed_emulator, "dashscope")
    between = datetime.fromtimestamp(T0 + 1800, UTC)
    assert [b.id for b in hook.list_batches(create_after=between)] == [late]
    assert [b.id for b in hook.list_batches(create_before=between)] == [early]
    text = between.astimezone(BEIJING).strftime("%Y%m%d%H%M%S")
    assert [b.id for b in hook.list_batches(create_after=text)] == [late]
    # The request files were created with their batches: the file list filters the same way.
    assert {f.created_at for f in hook.list_files(create_after=between)} == {
        datetime.fromtimestamp(T0 + 3600, UTC)
    }


@pytest.mark.parametrize("value", ["2027-01-15", "202701150800", "20271315080000", "x", "202701 1080000"])
def test_the_emulator_refuses_a_malformed_time_filter_even_on_an_empty_list(
    fixed_emulator: Emulator, value: str
) -> None:
    client = VendorClient(fixed_emulator, DASHSCOPE)
    try:
        for path in ("/batches", "/files"):
            response = client.http.get(path, params={"create_before": value})
            assert_error_body(DASHSCOPE, response, "bad_request")
            assert "create_before" in response.text
    finally:
        client.close()


# -- 2. page sizes above the maximum, and listings from a cursor -----------------------------------------


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_a_page_size_above_the_maximum_is_refused_not_capped(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], spec: VendorSpec
) -> None:
    most = spec.batch_list.max_limit
    assert most is not None
    hook = hook_for(fixed_emulator, spec.name)
    with pytest.raises(InvalidInputError, match=f"page_size: .*at most {most}.*got {most + 1}"):
        list(hook.list_batches(page_size=most + 1))
    assert _list_requests(fixed_emulator, spec.name) == 0
    with pytest.raises(InvalidInputError, match=f"at most {most}"):
        Pager(spec.batch_list, {}, most + 1)


def test_a_file_page_size_above_the_maximum_is_refused() -> None:
    most = DASHSCOPE.file_list.max_limit
    assert most == 2000
    assert _core(DASHSCOPE).file_pager(most, None, {}).params()["limit"] == "2000"
    with pytest.raises(InvalidInputError, match="at most 2000"):
        _core(DASHSCOPE).file_pager(most + 1, None, {})


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_a_batch_listing_starts_after_a_cursor(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], spec: VendorSpec
) -> None:
    client = VendorClient(fixed_emulator, spec)
    try:
        made = [client.batch_from([f"r{i}"])["id"] for i in range(4)]
    finally:
        client.close()
    hook = hook_for(fixed_emulator, spec.name)
    listed = [b.id for b in hook.list_batches()]
    assert sorted(listed) == sorted(made)
    assert [b.id for b in hook.list_batches(after=listed[0])] == listed[1:]
    # One item a page, from the cursor on: each page starts after the last one's end.
    assert [b.id for b in hook.list_batches(page_size=1, after=listed[1])] == listed[2:]
    assert list(hook.list_batches(after=listed[-1])) == []


@pytest.mark.parametrize("spec", [v for v in VENDORS if "after" in v.file_list.params], ids=lambda v: v.name)
def test_a_file_listing_starts_after_a_cursor(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], spec: VendorSpec
) -> None:
    client = VendorClient(fixed_emulator, spec)
    try:
        for i in range(3):
            client.batch_from([f"f{i}"])
    finally:
        client.close()
    hook = hook_for(fixed_emulator, spec.name)
    listed = [f.id for f in hook.list_files()]
    assert len(listed) == 3
    assert [f.id for f in hook.list_files(after=listed[0])] == listed[1:]


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
@pytest.mark.parametrize("after", ["", "  ", 7])
def test_an_empty_or_non_text_cursor_is_refused_before_any_request(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], spec: VendorSpec, after: Any
) -> None:
    hook = hook_for(fixed_emulator, spec.name)
    with pytest.raises(InvalidInputError, match="after: expected the id of a listed batch"):
        list(hook.list_batches(after=after))
    assert _list_requests(fixed_emulator, spec.name) == 0


def test_a_cursor_is_refused_where_the_vendor_has_none(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook]
) -> None:
    hook = hook_for(fixed_emulator, "moonshot")
    with pytest.raises(InvalidInputError, match="no cursor"):
        list(hook.list_files(after="file-1"))
    assert _list_requests(fixed_emulator, "moonshot", "files") == 0


# -- 3. Zhipu's counts, nested and flat ----------------------------------------------------------------


def test_zhipu_counts_come_both_nested_and_flat_and_are_read(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook]
) -> None:
    spec = REGISTRY["zhipu"]
    client = VendorClient(fixed_emulator, spec)
    try:
        batch_id = client.batch_from(["ok-1", "fail-2", "ok-3"])["id"]
        fixed_emulator.force_status("zhipu", batch_id, "completed")
        raw = client.get(batch_id)
    finally:
        client.close()
    assert raw["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert (raw["total"], raw["completed"], raw["failed"]) == (3, 2, 1)
    counts = hook_for(fixed_emulator, "zhipu").get_batch(batch_id).request_counts
    assert (counts.total, counts.completed, counts.failed) == (3, 2, 1)


@pytest.mark.parametrize("spec", [v for v in VENDORS if v.name != "zhipu"], ids=lambda v: v.name)
def test_other_vendors_keep_their_counts_nested_only(fixed_emulator: Emulator, spec: VendorSpec) -> None:
    client = VendorClient(fixed_emulator, spec)
    try:
        raw = client.batch_from(["a"])
    finally:
        client.close()
    assert "request_counts" in raw
    assert not {"total", "completed", "failed"} & set(raw)


# -- 4. error codes as the vendors' tables publish them -------------------------------------------------


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_every_code_in_use_has_its_source(spec: VendorSpec) -> None:
    dialect = spec.errors
    used = (
        {code for _, code in dialect.codes.values()} | set(dialect.code_kinds) | set(dialect.retryable_codes)
    )
    missing = used - set(dialect.code_table)
    assert not missing, f"{spec.name}: codes without a source: {sorted(missing)}"
    for code, doc in dialect.code_table.items():
        assert doc.source.startswith("https://"), code
        assert doc.meaning, code
    for kind, (status, code) in dialect.codes.items():
        documented = dialect.code_table[code].status
        assert documented in (None, status), f"{spec.name} {kind}: {code} is documented with {documented}"


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_every_retryable_code_family_is_a_sourced_code_and_its_members(spec: VendorSpec) -> None:
    dialect = spec.errors
    for prefix in dialect.retryable_prefixes:
        root = prefix.removesuffix(".")
        assert prefix == f"{root}.", f"{spec.name}: a family is '<code>.': {prefix!r}"
        assert root in dialect.retryable_codes
        assert root in dialect.code_table
    # Only DashScope names its codes in families; the others' codes are matched exactly.
    assert bool(dialect.retryable_prefixes) is (spec.name == "dashscope")


def test_zhipu_codes_mean_what_its_table_says() -> None:
    table = REGISTRY["zhipu"].errors.code_table
    assert "model does not exist" in table["1211"].meaning
    assert table["1211"].source == "https://docs.z.ai/api-reference/api-code"
    codes = REGISTRY["zhipu"].errors.codes
    assert codes["not_found"][1] != "1211"
    assert codes["file_too_large"][1] != "1215"  # 1215: two fields set at once
    # Zhipu documents no business code for an unknown batch: ours is marked as ours.
    assert codes["not_found"] == (404, "404")
    assert table["404"].documented is False


def test_dashscope_arrearage_is_an_http_400() -> None:
    assert DASHSCOPE.errors.codes["quota_exceeded"] == (400, "Arrearage")
    status, body = error_payload(DASHSCOPE, "quota_exceeded", "overdue", request_id="r1")
    assert status == 400
    assert body["error"]["code"] == body["error"]["type"] == "Arrearage"


VENDOR_TABLE: list[tuple[str, int, str, str, type[VendorAPIError]]] = [
    ("zhipu", 400, "1211", "get_batch", BadRequestError),  # the model does not exist
    ("zhipu", 400, "1214", "create_batch", BadRequestError),
    ("zhipu", 401, "1000", "get_batch", AuthenticationError),
    ("zhipu", 404, "404", "get_batch", NotFoundError),
    ("zhipu", 429, "1302", "get_batch", RateLimitError),
    ("zhipu", 429, "1113", "create_batch", QuotaExceededError),
    ("zhipu", 429, "1112", "get_batch", PermissionDeniedError),  # account locked: no rate limit to retry
    ("zhipu", 429, "1121", "get_batch", PermissionDeniedError),
    ("zhipu", 429, "1111", "get_batch", AuthenticationError),
    ("zhipu", 434, "1220", "upload_file", PermissionDeniedError),
    ("moonshot", 429, "exceeded_current_quota_error", "create_batch", QuotaExceededError),
    ("moonshot", 403, "exceeded_current_quota_error", "create_batch", QuotaExceededError),
    ("moonshot", 429, "engine_overloaded_error", "get_batch", RateLimitError),
    ("moonshot", 404, "resource_not_found_error", "get_batch", NotFoundError),
    ("dashscope", 400, "Arrearage", "create_batch", QuotaExceededError),
    ("dashscope", 400, "InvalidParameter", "create_batch", BadRequestError),
    ("dashscope", 401, "invalid_api_key", "get_batch", AuthenticationError),
    ("dashscope", 429, "Throttling.RateQuota", "get_batch", RateLimitError),
    ("dashscope", 404, "NotFound", "get_batch", NotFoundError),
]


@pytest.mark.parametrize(("vendor", "status", "code", "operation", "expected"), VENDOR_TABLE)
def test_vendor_codes_map_to_their_exception(
    vendor: str, status: int, code: str, operation: str, expected: type[VendorAPIError]
) -> None:
    spec = REGISTRY[vendor]
    field = "code" if "code" in dialect_of(spec).errors.fields else "type"
    exc = errors.error_from_response(
        spec,
        status=status,
        reason="x",
        headers={},
        content=json.dumps({"error": {field: code, "message": "m"}}).encode(),
        conn_id="c",
        operation=operation,
        secret="sk-secret",
    )
    assert type(exc) is expected
    assert exc.code == code


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_every_kind_the_emulator_answers_reaches_its_exception(spec: VendorSpec) -> None:
    for kind, cls in errors.KIND_EXCEPTIONS.items():
        operation = "cancel_batch" if kind == "conflict" else "get_batch"
        status, body = error_payload(spec, kind, "m", request_id="r")
        exc = errors.error_from_response(
            spec,
            status=status,
            reason="x",
            headers={},
            content=json.dumps(body).encode(),
            conn_id="c",
            operation=operation,
            secret=None,
        )
        # A code shared by several kinds is read by its HTTP status: bad_request and file_too_large share
        # DashScope's 400 InvalidParameter, and a too-large file is then a bad request.
        shared = [k for k, pair in spec.errors.codes.items() if pair == spec.errors.codes[kind]]
        if len(shared) == 1 or kind in ("conflict", "bad_request"):
            assert type(exc) is cls, (spec.name, kind)
        else:
            assert isinstance(exc, BadRequestError), (spec.name, kind)


@pytest.mark.parametrize("spec", VENDORS, ids=[v.name for v in VENDORS])
def test_an_unknown_batch_is_not_found_on_the_wire(
    fixed_emulator: Emulator, hook_for: Callable[[Emulator, str], BatchHook], spec: VendorSpec
) -> None:
    client = VendorClient(fixed_emulator, spec)
    try:
        assert_error_body(spec, client.http.get("/batches/batch_missing"), "not_found")
    finally:
        client.close()
    with pytest.raises(NotFoundError) as caught:
        hook_for(fixed_emulator, spec.name).get_batch("batch_missing")
    assert caught.value.code == spec.errors.codes["not_found"][1]


# -- 5. the console of the connection's region ---------------------------------------------------------


@pytest.mark.parametrize(
    ("vendor", "region", "host"),
    [
        ("dashscope", "cn-beijing", "bailian.console.aliyun.com"),
        ("dashscope", "ap-singapore", "modelstudio.console.alibabacloud.com"),
        ("moonshot", "cn", "platform.moonshot.cn"),
        ("moonshot", "intl", "platform.moonshot.ai"),
        ("zhipu", "cn", "open.bigmodel.cn"),
        ("openai", "default", "platform.openai.com"),
        ("dashscope", None, "bailian.console.aliyun.com"),
        ("moonshot", "mars", "platform.moonshot.cn"),
    ],
)
def test_console_follows_the_region(vendor: str, region: str | None, host: str) -> None:
    url = console_url(REGISTRY[vendor].conn_type, "batch_1", region)
    assert httpx.URL(url).host == host
    assert "batch_1" in url


def test_a_region_without_a_known_console_gets_no_link() -> None:
    assert console_url("llmbatch_zhipu", "batch_1", "intl") == ""


@pytest.mark.parametrize(
    ("vendor", "host", "extra", "region"),
    [
        ("dashscope", None, {}, "cn-beijing"),
        ("dashscope", None, {"region": "ap-singapore"}, "ap-singapore"),
        ("dashscope", "https://dashscope-intl.aliyuncs.com/compatible-mode/v1", {}, "ap-singapore"),
        (
            "dashscope",
            "dashscope-intl.aliyuncs.com/compatible-mode/v1",
            {"region": "cn-beijing"},
            "ap-singapore",
        ),
        ("moonshot", "https://api.moonshot.ai/v1", {}, "intl"),
        ("moonshot", "http://127.0.0.1:8765/moonshot/v1", {"region": "intl"}, "intl"),
        ("moonshot", "http://127.0.0.1:8765/moonshot/v1", {}, "cn"),
        ("moonshot", None, {"region": "mars"}, None),
    ],
)
def test_connection_region(vendor: str, host: str | None, extra: dict[str, Any], region: str | None) -> None:
    assert connection_region(REGISTRY[vendor], host, extra) == region


@pytest.fixture
def xcoms(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    store: dict[str, object] = {}
    monkeypatch.setattr(link_module.XCom, "get_value", staticmethod(lambda *, ti_key, key: store.get(key)))
    return store


@pytest.mark.parametrize(
    ("vendor", "extra", "host"),
    [
        ("dashscope", {"region": "ap-singapore"}, "modelstudio.console.alibabacloud.com"),
        ("dashscope", {}, "bailian.console.aliyun.com"),
        ("moonshot", {"region": "intl"}, "platform.moonshot.ai"),
        ("moonshot", {"region": "cn"}, "platform.moonshot.cn"),
    ],
)
def test_the_link_reads_the_region_from_the_task_connection(
    monkeypatch: pytest.MonkeyPatch, xcoms: dict[str, object], vendor: str, extra: dict[str, Any], host: str
) -> None:
    spec = REGISTRY[vendor]
    conn = {"conn_type": spec.conn_type, "password": "sk-never-in-a-link", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_LINK_REGION", json.dumps(conn))
    xcoms.update(batch_id="batch_7", conn_type=spec.conn_type)
    url = BatchConsoleLink().get_link(SimpleNamespace(conn_id="link_region"), ti_key=SimpleNamespace())  # type: ignore[arg-type]
    assert httpx.URL(url).host == host
    assert "batch_7" in url
    assert "sk-never" not in url


def test_the_link_falls_back_to_the_default_console_without_a_readable_connection(
    xcoms: dict[str, object],
) -> None:
    xcoms.update(batch_id="batch_7", conn_type="llmbatch_dashscope")
    operator = SimpleNamespace(conn_id="no_such_connection_anywhere")
    url = BatchConsoleLink().get_link(operator, ti_key=SimpleNamespace())  # type: ignore[arg-type]
    assert url == DASHSCOPE.console_url_for("cn-beijing").format(batch_id="batch_7")


def _core(spec: VendorSpec) -> Core:
    settings = settings_from_connection(
        "unit", conn_type=spec.conn_type, host=None, password="sk-unit", extra={}
    )
    return Core(settings)
