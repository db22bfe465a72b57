"""Table tests of the I/O-free hook core: request building, answers read, paging, finding lost creations."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import pytest

from airflow_provider_llmbatch.exceptions import InvalidInputError, MalformedResponseError, WrongObjectError
from airflow_provider_llmbatch.hooks._core import (
    UPLOAD_LOOKBACK_SECONDS,
    Core,
    Pager,
    Reply,
    count_batch_files,
    find_newest,
    pick_upload,
)
from airflow_provider_llmbatch.hooks._io import multipart_layout, source_name
from airflow_provider_llmbatch.hooks.arguments import (
    IDEMPOTENCY_KEY,
    IDEMPOTENCY_KEY_LENGTH,
    check_create_args,
    check_user_metadata,
)
from airflow_provider_llmbatch.hooks.settings import settings_from_connection
from airflow_provider_llmbatch.models import Batch, FileObject, Page, RequestCounts
from airflow_provider_llmbatch.vendors import REGISTRY, ListSpec, VendorSpec

KEY = "sk-core-test-key-0123456789"
VENDORS = list(REGISTRY.values())


def _core(vendor: VendorSpec) -> Core:
    return Core(
        settings_from_connection(
            "c1", conn_type=vendor.conn_type, host="http://127.0.0.1:9/x", password=KEY, extra={}
        )
    )


# -- create_batch -----------------------------------------------------------------------------------


def _refusal(call: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return call(), None
    except InvalidInputError as exc:
        return None, str(exc)


def create(vendor: VendorSpec, **kw: Any) -> tuple[dict[str, Any], str]:
    """Build a create request; return its body and key. The operators' pre-check refuses the same."""
    input_file_id = kw.pop("input_file_id", "f")
    args: dict[str, Any] = {"endpoint": None, "completion_window": None, "metadata": None, "extra": None}
    args.update(kw)
    built, refused = _refusal(lambda: _core(vendor).create_batch(input_file_id=input_file_id, **args))
    assert _refusal(lambda: check_create_args(vendor, **args))[1] == refused
    if refused is not None:
        raise InvalidInputError(refused)
    request, key = built
    assert (request.method, request.path, request.idempotent) == ("POST", "/batches", False)
    return dict(json.loads(request.body)), key


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_create_defaults_from_the_spec(vendor: VendorSpec) -> None:
    body, key = create(vendor, input_file_id="file-1")
    assert body["input_file_id"] == "file-1"
    assert body["endpoint"] == vendor.default_endpoint
    assert body["completion_window"] == vendor.completion_window.default
    assert "completion_window" in body  # sent as null where the vendor ignores it
    assert body["metadata"] == {IDEMPOTENCY_KEY: key}


def test_every_create_gets_a_fresh_key() -> None:
    keys = {create(REGISTRY["openai"])[1] for _ in range(20)}
    assert len(keys) == 20
    assert all(len(k) == IDEMPOTENCY_KEY_LENGTH and int(k, 16) >= 0 for k in keys)


def test_ignored_window_is_null_unless_given() -> None:
    assert create(REGISTRY["zhipu"])[0]["completion_window"] is None
    assert create(REGISTRY["zhipu"], completion_window="72h")[0]["completion_window"] == "72h"


@pytest.mark.parametrize(
    ("vendor", "window", "ok"),
    [
        ("moonshot", "12h", True),
        ("moonshot", "7d", True),
        ("moonshot", "8d", False),
        ("moonshot", "6h", False),
        ("dashscope", "14d", True),
        ("dashscope", "15d", False),
        ("openai", "24h", True),
        ("openai", "1d", False),
        ("openai", "48h", False),
        ("zhipu", "whenever", False),
    ],
)
def test_completion_window_is_checked(vendor: str, window: str, ok: bool) -> None:
    if ok:
        assert create(REGISTRY[vendor], completion_window=window)[0]["completion_window"] == window
    else:
        with pytest.raises(InvalidInputError, match="completion_window"):
            create(REGISTRY[vendor], completion_window=window)


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_unknown_endpoint_names_the_allowed(vendor: VendorSpec) -> None:
    with pytest.raises(InvalidInputError, match=vendor.default_endpoint):
        create(vendor, endpoint="/v9/nope")


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_metadata_limits_count_the_key_in(vendor: VendorSpec) -> None:
    limits = vendor.limits
    room = {f"k{i}": "v" for i in range(limits.metadata_pairs - 1)}
    body, key = create(vendor, metadata=room)
    assert body["metadata"] == {**room, IDEMPOTENCY_KEY: key}
    with pytest.raises(InvalidInputError, match="at most"):
        create(vendor, metadata={**room, "one": "more"})
    with pytest.raises(InvalidInputError, match="metadata key"):
        create(vendor, metadata={"k" * (limits.metadata_key_chars + 1): "v"})
    with pytest.raises(InvalidInputError, match="metadata value"):
        create(vendor, metadata={"k": "v" * (limits.metadata_value_chars + 1)})
    with pytest.raises(InvalidInputError, match="strings"):
        create(vendor, metadata={"k": 1})


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_the_idempotency_key_is_the_hooks_own(vendor: VendorSpec) -> None:
    with pytest.raises(InvalidInputError, match=f"{IDEMPOTENCY_KEY!r} is set by the hook itself"):
        _core(vendor).create_batch(
            input_file_id="f",
            endpoint=None,
            completion_window=None,
            metadata={IDEMPOTENCY_KEY: "mine"},
            extra=None,
        )
    with pytest.raises(InvalidInputError, match="reserved for the provider"):
        check_user_metadata({"owner": "me", "llmbatch_anything": "x"})
    check_user_metadata({"owner": "me"})


SAMPLES = {"boolean": False, "string": "x", "object": {"anchor": "created_at", "seconds": 3600}, "integer": 3}


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_extra_fields_from_the_spec(vendor: VendorSpec) -> None:
    allowed = ", ".join(f.name for f in vendor.extra_create_fields) or "none"
    with pytest.raises(InvalidInputError, match="allowed: " + allowed):
        create(vendor, extra={"bogus": 1})
    for field in vendor.extra_create_fields:
        body, _ = create(vendor, extra={field.name: SAMPLES[field.type]})
        if field.in_metadata:
            assert body["metadata"][field.name] == SAMPLES[field.type]
            assert field.name not in body
        else:
            assert body[field.name] == SAMPLES[field.type]
        with pytest.raises(InvalidInputError, match=field.name):
            create(vendor, extra={field.name: 12345 if field.type != "integer" else "x"})


def test_dashscope_ds_name_limit_applies_via_extra() -> None:
    with pytest.raises(InvalidInputError, match="at most 100"):
        create(REGISTRY["dashscope"], extra={"ds_name": "n" * 101})


@pytest.mark.parametrize("bad", ["", "  ", None])
def test_ids_must_be_non_empty(bad: Any) -> None:
    core = _core(REGISTRY["openai"])
    for build in (core.get_batch, core.get_file, core.delete_file, core.cancel_batch, core.file_content):
        with pytest.raises(InvalidInputError):
            build(bad)
    with pytest.raises(InvalidInputError, match="input_file_id"):
        core.create_batch(input_file_id=bad, endpoint=None, completion_window=None, metadata=None, extra=None)


def test_ids_are_path_quoted() -> None:
    assert _core(REGISTRY["openai"]).get_file("a/b c").path == "/files/a%2Fb%20c"


def test_what_may_be_repeated_and_what_each_answer_must_be_about() -> None:
    core = _core(REGISTRY["openai"])
    requests = {
        "upload": core.upload(),
        "get_file": core.get_file("f1"),
        "delete": core.delete_file("f1"),
        "content": core.file_content("f1"),
        "get_batch": core.get_batch("b1"),
        "cancel": core.cancel_batch("b1"),
        "list": core.list_request("batches", {}),
    }
    assert {name for name, r in requests.items() if not r.idempotent} == {"upload"}
    assert {name: r.object_id for name, r in requests.items() if r.object_id} == {
        "get_file": "f1",
        "get_batch": "b1",
        "cancel": "b1",
    }


# -- answers: read leniently, refused when they are not what was asked ------------------------------------


def _reply(data: Any, **headers: str) -> Reply:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return Reply(200, headers, body)


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b'{"id": "b1", "stat', MalformedResponseError, "the get_batch response is not JSON"),
        (b"[" * 100_000, MalformedResponseError, "not JSON"),
        ({"object": "batch"}, MalformedResponseError, "not a Batch: id: Field required"),
        (["b1"], MalformedResponseError, "not a Batch"),
        ({"id": "b2", "status": "completed"}, WrongObjectError, "asked for 'b1', the answer is about 'b2'"),
    ],
    ids=["truncated", "too-deep", "no-id", "a-list", "another-batch"],
)
def test_answers_that_are_not_the_batch_asked_for(data: Any, error: type[Exception], match: str) -> None:
    core = _core(REGISTRY["openai"])
    with pytest.raises(error, match=match) as info:
        core.parse(core.get_batch("b1"), _reply(data, **{"x-request-id": "rid-7"}), Batch)
    assert type(info.value) is error
    assert (info.value.status_code, info.value.request_id) == (200, "rid-7")
    assert info.value.operation == "get_batch"


def test_lenient_fields_still_parse() -> None:
    core = _core(REGISTRY["openai"])
    data = {"id": "b1", "status": " Completed ", "request_counts": None, "metadata": {"a": 1}, "extra": [1]}
    batch = core.parse(core.get_batch("b1"), _reply(data), Batch)
    assert (batch.status, batch.request_counts, batch.metadata) == ("completed", RequestCounts(), {"a": "1"})


@pytest.mark.parametrize(
    ("data", "ids", "has_more"),
    [
        ({"data": [{"id": "f1"}, {"no": "id"}, "junk", {"id": "f2"}], "has_more": True}, ["f1", "f2"], True),
        ({"data": None}, [], None),
        ({"data": {"id": "f1"}, "has_more": "yes"}, [], None),
        ({}, [], None),
    ],
    ids=["items-without-id-skipped", "data-null", "data-not-a-list", "empty-object"],
)
def test_pages_are_read_leniently(data: dict[str, Any], ids: list[str], has_more: bool | None) -> None:
    core = _core(REGISTRY["openai"])
    page = core.parse_page(core.list_request("files", {}), _reply(data), FileObject)
    assert ([f.id for f in page.data], page.has_more) == (ids, has_more)


def test_a_page_that_is_not_an_object_is_malformed() -> None:
    core = _core(REGISTRY["openai"])
    with pytest.raises(MalformedResponseError, match="the list_files response is not an object"):
        core.parse_page(core.list_request("files", {}), _reply([{"id": "f1"}]), FileObject)


# -- finding what a call of unknown effect made ------------------------------------------------------------

STARTED = 1_800_000_000.0


def _file(file_id: str, name: str = "in.jsonl", size: int = 10, created: float | None = STARTED) -> Any:
    return FileObject(id=file_id, filename=name, bytes=size, created_at=created)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ([_file("f1")], "f1"),
        ([_file("old", created=STARTED - UPLOAD_LOOKBACK_SECONDS - 1), _file("new")], "new"),
        ([_file("a", created=STARTED + 1), _file("b", created=STARTED + 5), _file("c")], "b"),
        ([_file("other-name", name="x.jsonl"), _file("other-size", size=11)], None),
        ([_file("no-time", created=None)], None),
        ([], None),
    ],
    ids=["same", "too-old", "newest", "name-or-size-differs", "no-created-at", "none"],
)
def test_pick_upload(files: list[FileObject], expected: str | None) -> None:
    found = pick_upload(files, "in.jsonl", 10, STARTED)
    assert (found.id if found else None) == expected


def _batch(batch_id: str, created: int, **metadata: str) -> Batch:
    return Batch(id=batch_id, status="validating", created_at=int(STARTED) + created, metadata=metadata)


def test_find_newest_stops_at_the_first_page_with_a_match() -> None:
    pages = iter(
        [
            [_batch("b0", 5), _batch("old", 1, k="v"), _batch("new", 2, k="v", x="y")],
            [_batch("later-page", 9, k="v")],
        ]
    )
    found = find_newest(pages, {"k": "v"}, max_scan=100)
    assert found is not None
    assert found.id == "new"
    assert next(pages)[0].id == "later-page"  # never read
    assert find_newest(iter([[_batch("b", 1, k="v")]] * 5), {"k": "nope"}, max_scan=3) is None


# -- listing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_batch_filters_from_the_spec(vendor: VendorSpec) -> None:
    core = _core(vendor)
    allowed = sorted(vendor.batch_list.params - {"after", "limit"})
    with pytest.raises(InvalidInputError, match="allowed: " + (", ".join(allowed) or "none")):
        core.batch_pager(None, {"colour": "red"})
    for name in sorted(set(allowed) - vendor.batch_list.time_params):
        pager = core.batch_pager(5, {name: ["a", "b"]})
        assert pager.params()[name] == "a,b"


TIME_CASES = [
    (datetime(2026, 3, 1, 0, 0, tzinfo=UTC), "20260301080000"),  # UTC midnight is 08:00 in Beijing
    (datetime(2026, 3, 1, 8, 30, 5, tzinfo=timezone(timedelta(hours=8))), "20260301083005"),
    (datetime(2026, 2, 28, 20, 0, tzinfo=timezone(timedelta(hours=-5))), "20260301090000"),
    ("20260301083005", "20260301083005"),
]


@pytest.mark.parametrize(("value", "sent"), TIME_CASES)
@pytest.mark.parametrize("list_of", ["batch", "file"])
def test_dashscope_time_filters(value: Any, sent: str, list_of: str) -> None:
    core = _core(REGISTRY["dashscope"])
    pager = (
        core.batch_pager(None, {"create_after": value})
        if list_of == "batch"
        else core.file_pager(None, None, {"create_before": value})
    )
    assert sent in pager.params().values()


@pytest.mark.parametrize(
    "value", [datetime(2026, 3, 1), "2026-03-01", "202603010000", "20261301000000", 20260301000000, ["x"]]
)
def test_dashscope_time_filters_refuse_what_they_cannot_send(value: Any) -> None:
    with pytest.raises(InvalidInputError, match="create_after"):
        _core(REGISTRY["dashscope"]).batch_pager(None, {"create_after": value})


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_page_size_above_the_vendor_maximum_is_refused(vendor: VendorSpec) -> None:
    most = vendor.batch_list.max_limit
    assert most is not None
    assert core_params(_core(vendor).batch_pager(most, {}))["limit"] == str(most)
    with pytest.raises(InvalidInputError, match=f"at most {most}"):
        _core(vendor).batch_pager(most + 1, {})


@pytest.mark.parametrize("vendor", VENDORS, ids=[v.name for v in VENDORS])
def test_a_listing_can_start_after_a_cursor(vendor: VendorSpec) -> None:
    assert _core(vendor).batch_pager(None, {}, after="batch_9").params()["after"] == "batch_9"


def test_a_cursor_is_refused_where_the_list_has_none() -> None:
    with pytest.raises(InvalidInputError, match="no cursor"):
        _core(REGISTRY["moonshot"]).file_pager(None, None, {}, after="file-1")


def core_params(pager: Any) -> dict[str, str]:
    return dict(pager.params())


def test_file_purpose_is_sent_only_where_accepted() -> None:
    assert _core(REGISTRY["openai"]).file_pager(None, "batch", {}).params() == {"purpose": "batch"}
    assert _core(REGISTRY["moonshot"]).file_pager(10, "batch", {}).params() == {}


@pytest.mark.parametrize("page_size", [0, -1, "10"])
def test_bad_page_size(page_size: Any) -> None:
    with pytest.raises(InvalidInputError, match="page_size"):
        _core(REGISTRY["openai"]).batch_pager(page_size, {})


def _page(ids: list[str], **kw: Any) -> Page[Batch]:
    return Page[Batch].model_validate({"data": [{"id": i, "status": "completed"} for i in ids], **kw})


FULL = ListSpec(params=frozenset({"after", "limit"}))


@pytest.mark.parametrize(
    ("spec", "pages", "expected", "requests"),
    [
        (
            FULL,
            [_page(["a", "b"], has_more=True, last_id="b"), _page(["c"], has_more=False)],
            ["a", "b", "c"],
            2,
        ),
        (FULL, [_page(["a", "b"], has_more=True), _page(["c"])], ["a", "b", "c"], 2),
        (
            FULL,
            [_page(["a"], has_more=True, last_id="a"), _page(["a"], has_more=True, last_id="a")],
            ["a"],
            2,
        ),
        (FULL, [_page(["a", "b"], has_more=True), _page(["a", "b"], has_more=True)], ["a", "b"], 2),
        (FULL, [_page([], has_more=True)], [], 1),
        (FULL, [_page(["a"], has_more=True, last_id=""), _page(["b"])], ["a", "b"], 2),
        (FULL, [_page(["a"])], ["a"], 1),
        (ListSpec(params=frozenset()), [_page(["a", "b"], has_more=True)], ["a", "b"], 1),
    ],
    ids=[
        "has-more",
        "cursor-from-data",
        "stuck-cursor",
        "repeated-page",
        "empty-page",
        "empty-last-id",
        "no-has-more",
        "no-after",
    ],
)
def test_pager_always_ends(
    spec: ListSpec, pages: list[Page[Batch]], expected: list[str], requests: int
) -> None:
    pager = Pager(spec, {}, 2)
    got: list[str] = []
    sent: list[dict[str, str]] = []
    feed = iter(pages)
    while not pager.done:
        sent.append(pager.params())
        got += [b.id for b in pager.feed(next(feed))]
    assert got == expected
    assert len(sent) == requests
    if requests > 1:
        assert sent[1]["after"] in {"a", "b"}


# -- multipart, names ------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["in.jsonl", 'we"ird\\name.jsonl', "名前.jsonl"])
def test_multipart_layout_parses_as_a_form(filename: str) -> None:
    layout = multipart_layout({"purpose": "batch"}, filename=filename, boundary="BOUNDARY")
    content = b'{"a":1}\n{"b":2}\n'
    body = layout.head + content + layout.tail
    assert layout.headers(len(content))["Content-Length"] == str(len(body))
    assert "Content-Length" not in layout.headers(None)  # an unknown size goes chunked
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {layout.content_type}\r\n\r\n".encode() + body
    )
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["purpose", "file"]
    assert parts[0].get_payload(decode=True) == b"batch"
    assert parts[1].get_payload(decode=True) == content


@pytest.mark.parametrize(
    ("source", "expected"),
    [("/a/b/in.jsonl", "in.jsonl"), ("rel.jsonl", "rel.jsonl"), (object(), "input.jsonl")],
)
def test_source_name(source: Any, expected: str) -> None:
    assert source_name(source) == expected


def test_the_quota_count_takes_only_whole_earlier_uploads_as_reused() -> None:
    def file(n: int, name: str | None, size: int | None, status: str | None = "processed") -> FileObject:
        return FileObject(id=f"f{n}", filename=name, bytes=size, status=status)

    reusable = {"part-1.jsonl": 10, "part-2.jsonl": 20, "part-3.jsonl": 30, "part-4.jsonl": 40}
    listed = [
        file(1, "part-1.jsonl", 10),  # reused
        file(2, "part-2.jsonl", None),  # no size given: reused
        file(3, "part-3.jsonl", 29),  # cut short: uploaded again
        file(4, "part-4.jsonl", 40, "error"),  # failed: uploaded again
        file(5, "part-1.jsonl", 10),  # a second copy counts once
        file(6, None, 10),
        file(7, "other.jsonl", 10),
    ]
    assert count_batch_files(listed, reusable) == (7, 2)
    assert count_batch_files(listed, {}) == (7, 0)
    assert count_batch_files([], reusable) == (0, 0)


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_a_whole_file_listing_asks_for_the_vendors_largest_page(spec: VendorSpec) -> None:
    largest = _core(spec).file_scan_page_size()
    if "limit" not in spec.file_list.params:
        assert largest is None
        return
    assert largest == spec.file_list.max_limit
    assert _core(spec).file_pager(largest, "batch", {}).params()["limit"] == str(largest)
