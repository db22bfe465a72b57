"""Single edge cases of the sync face the emulator cannot produce, against ``httpx.MockTransport``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hookmock import Broken, Script, batch_json, ok

from airflow_provider_llmbatch.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    InvalidInputError,
    MalformedResponseError,
    NotFoundError,
    QuotaExceededError,
    RateLimitError,
    ServerError,
    VendorAPIError,
    WrongObjectError,
)
from airflow_provider_llmbatch.get_provider_info import hook_class_name
from airflow_provider_llmbatch.hooks import batch as batch_module
from airflow_provider_llmbatch.hooks.arguments import IDEMPOTENCY_KEY
from airflow_provider_llmbatch.hooks.batch import VENDOR_HOOKS, BatchHook
from airflow_provider_llmbatch.retry import RetryPolicy
from airflow_provider_llmbatch.vendors import REGISTRY


def _connect_error(request: httpx.Request) -> httpx.ConnectError:
    return httpx.ConnectError("connection refused", request=request)


def _read_timeout(request: httpx.Request) -> httpx.ReadTimeout:
    return httpx.ReadTimeout("timed out", request=request)


def _error(status: int, message: str = "x", code: str | None = None, **headers: str) -> httpx.Response:
    body = {"error": {"message": message, **({"code": code} if code else {})}}
    return httpx.Response(status, json=body, headers=headers)


# -- retries of idempotent calls ---------------------------------------------------------------------


def test_get_retries_5xx_then_succeeds(
    mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    script.on("GET", "/batches/b1", ok({}, 500), ok({}, 502), ok(batch_json("b1", "in_progress")))
    assert mock_hook().get_batch("b1").status == "in_progress"
    assert script.calls("GET", "/batches/b1") == 3
    assert len(slept) == 2
    assert all(0 <= s <= 1.0 for s in slept)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_error(503, "down"), ServerError),
        (_error(429, code="rate_limit_exceeded"), RateLimitError),
        (_read_timeout, APITimeoutError),
        (_connect_error, APIConnectionError),
        (ok(batch_json("b2")), WrongObjectError),
    ],
    ids=["503", "429", "read-timeout", "connect-error", "answer-about-another-batch"],
)
def test_gives_up_after_max_retries_with_the_last_error(
    answer: Any,
    error: type[VendorAPIError],
    mock_hook: Callable[..., BatchHook],
    script: Script,
    slept: list[float],
) -> None:
    script.on("GET", "/batches/b1", answer)
    with pytest.raises(error) as info:
        mock_hook().get_batch("b1")
    assert type(info.value) is error
    assert script.calls("GET", "/batches/b1") == 4  # 1 + max_retries (3)
    assert len(slept) == 3


def test_one_attempt_when_retry_is_off(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("GET", "/batches/b1", ok({}, 500))
    with pytest.raises(ServerError):
        mock_hook().get_batch("b1", retry=False)
    assert script.calls("GET", "/batches/b1") == 1


def test_max_retries_comes_from_the_connection(
    connect: Callable[..., str], script: Script, hooks: Callable[[BatchHook], BatchHook]
) -> None:
    script.on("GET", "/batches/b1", ok({}, 500))
    hook = hooks(BatchHook(connect(extra={"max_retries": 1})))
    assert hook.retry_policy.max_retries == 1
    hook._client = httpx.Client(transport=httpx.MockTransport(script.handler))
    object.__setattr__(hook.retry_policy, "sleep", lambda seconds: None)  # frozen policy: no real sleeps
    with pytest.raises(ServerError):
        hook.get_batch("b1")
    assert script.calls("GET", "/batches/b1") == 2


def test_retry_policy_argument_wins_over_the_connection(connect: Callable[..., str]) -> None:
    policy = RetryPolicy(max_retries=9)
    assert BatchHook(connect(extra={"max_retries": 1}), retry_policy=policy).retry_policy is policy


def test_429_honours_retry_after(
    mock_hook: Callable[..., BatchHook], script: Script, slept: list[float]
) -> None:
    limited = _error(429, "slow", "rate_limit_exceeded", **{"Retry-After": "7"})
    script.on("GET", "/batches/b1", limited, ok(batch_json("b1")))
    assert mock_hook().get_batch("b1").id == "b1"
    assert slept == [7.0]


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_error(429, "pay", "insufficient_quota"), QuotaExceededError),
        (_error(401, "key"), AuthenticationError),
        (httpx.Response(200, content=b'{"id": "b1", "stat'), MalformedResponseError),
    ],
    ids=["quota", "401", "malformed-200"],
)
def test_what_retrying_cannot_fix_is_raised_at_once(
    answer: httpx.Response,
    error: type[VendorAPIError],
    mock_hook: Callable[..., BatchHook],
    script: Script,
    slept: list[float],
) -> None:
    script.on("POST", "/batches", answer)
    with pytest.raises(error):
        mock_hook().create_batch(input_file_id="f1")
    assert script.calls("POST", "/batches") == 1
    assert script.calls("GET", "/batches") == 0
    assert slept == []


# -- create: never blindly repeated -------------------------------------------------------------------


def _created_from_request(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return ok(batch_json("b-new", input_file_id=body["input_file_id"], metadata=body["metadata"]))


def _listing(created: dict[str, Any], input_file_id: str = "f1") -> Callable[[httpx.Request], httpx.Response]:
    """List one batch tagged with the key of the create that was sent, and one of someone else."""

    def answer(request: httpx.Request) -> httpx.Response:
        mine = batch_json("b-created", input_file_id=input_file_id, metadata=created["metadata"])
        other = batch_json("b-other", input_file_id="f1", metadata={IDEMPOTENCY_KEY: "someone-else"})
        return ok({"data": [other, mine], "has_more": False})

    return answer


@pytest.mark.parametrize("failure", ["500", "read-timeout", "reset"])
def test_create_of_unknown_effect_is_found_not_repeated(
    failure: str, mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    created: dict[str, Any] = {}

    def accept_then_fail(request: httpx.Request) -> Any:
        created.update(json.loads(request.content))
        if failure == "500":
            return ok({"error": {"message": "oops"}}, 500)
        if failure == "read-timeout":
            return _read_timeout(request)
        return httpx.Response(200, stream=Broken(b'{"id": "b-'))

    script.on("POST", "/batches", accept_then_fail)
    script.on("GET", "/batches", _listing(created))
    assert mock_hook().create_batch(input_file_id="f1").id == "b-created"
    assert script.calls("POST", "/batches") == 1


def test_a_found_batch_of_another_input_file_is_not_taken(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    created: dict[str, Any] = {}

    def accept_then_fail(request: httpx.Request) -> Any:
        created.update(json.loads(request.content))
        return ok({}, 502)

    script.on("POST", "/batches", accept_then_fail, _created_from_request)
    script.on("GET", "/batches", _listing(created, input_file_id="f-other"))
    assert mock_hook().create_batch(input_file_id="f1").id == "b-new"
    assert script.calls("POST", "/batches") == 2


def test_create_of_unknown_effect_is_repeated_with_the_same_key_when_not_found(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", ok({}, 502), _created_from_request)
    script.on("GET", "/batches", ok({"data": [], "has_more": False}))
    batch = mock_hook().create_batch(input_file_id="f1", metadata={"owner": "me"})
    assert batch.id == "b-new"
    assert script.calls("GET", "/batches") == 1
    first, second = (json.loads(b) for b in script.sent("POST"))
    assert first == second  # the same idempotency key both times
    assert first["metadata"] == {"owner": "me", IDEMPOTENCY_KEY: first["metadata"][IDEMPOTENCY_KEY]}


def test_create_connect_error_is_repeated_without_lookup(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", _connect_error, _created_from_request)
    assert mock_hook().create_batch(input_file_id="f1").id == "b-new"
    assert script.calls("POST", "/batches") == 2
    assert script.calls("GET", "/batches") == 0


def test_failed_lookup_raises_the_original_error_and_never_repeats(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches", ok({"error": {"message": "create broke"}}, 500), _created_from_request)
    script.on("GET", "/batches", _error(401, "no"))
    with pytest.raises(ServerError, match="create broke") as info:
        mock_hook().create_batch(input_file_id="f1")
    assert info.value.operation == "create_batch"
    assert script.calls("POST", "/batches") == 1
    assert script.calls("GET", "/batches") == 1


def test_the_hooks_key_in_caller_metadata_is_refused_before_any_request(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    with pytest.raises(InvalidInputError, match="set by the hook itself"):
        mock_hook().create_batch(input_file_id="f1", metadata={IDEMPOTENCY_KEY: "mine"})
    assert script.requests == []


# -- cancel and delete: a repeat that meets the first attempt's effect --------------------------------------


@pytest.mark.parametrize(
    "answers",
    [[_error(409, "already ended")], [ok({}, 500), _error(409, "already")]],
    ids=["ended", "repeat"],
)
def test_cancel_that_meets_a_conflict_returns_the_batch_as_it_is(
    answers: list[httpx.Response], mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("POST", "/batches/b1/cancel", *answers)
    script.on("GET", "/batches/b1", ok(batch_json("b1", "completed")))
    assert mock_hook().cancel_batch("b1").status == "completed"
    assert script.calls("POST", "/batches/b1/cancel") == len(answers)


def test_delete_repeat_that_finds_it_gone_is_done(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("DELETE", "/files/f1", _read_timeout, _error(404, "gone"))
    mock_hook().delete_file("f1")
    assert script.calls("DELETE", "/files/f1") == 2


def test_delete_of_a_missing_file_is_not_found(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on("DELETE", "/files/f1", _error(404, "gone"))
    with pytest.raises(NotFoundError):
        mock_hook().delete_file("f1")


# -- lists ---------------------------------------------------------------------------------------------


def test_list_that_ignores_after_terminates(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    page = ok({"data": [batch_json("b2"), batch_json("b1")], "has_more": True, "last_id": "b1"})
    script.on("GET", "/batches", page)
    assert [b.id for b in mock_hook().list_batches(page_size=2)] == ["b2", "b1"]
    assert script.calls("GET", "/batches") == 2
    assert script.requests[1].url.params["after"] == "b1"


def test_a_failed_page_is_retried_alone(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    script.on(
        "GET",
        "/batches",
        ok({"data": [batch_json("b2")], "has_more": True, "last_id": "b2"}),
        ok({}, 503),
        ok({"data": [batch_json("b1")], "has_more": False}),
    )
    assert [b.id for b in mock_hook().list_batches(page_size=1)] == ["b2", "b1"]
    assert [r.url.params.get("after") for r in script.requests] == [None, "b2", "b2"]


def test_moonshot_file_list_is_one_request(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    files = [{"id": "f1", "purpose": "batch"}, {"id": "f2", "purpose": "other"}, {"id": "f3"}]
    script.on("GET", "/files", ok({"data": files}))
    assert [f.id for f in mock_hook("moonshot").list_files(purpose="batch")] == ["f1", "f3"]
    assert script.calls("GET", "/files") == 1
    assert dict(script.requests[0].url.params) == {}


def test_unknown_filter_fails_before_any_request(mock_hook: Callable[..., BatchHook], script: Script) -> None:
    with pytest.raises(InvalidInputError, match="status"):
        list(mock_hook("openai").list_batches(status="completed"))
    with pytest.raises(
        InvalidInputError, match="allowed: create_after, create_before, ds_name, input_file_ids, status"
    ):
        list(mock_hook("dashscope").list_batches(colour="red"))
    assert script.requests == []


def test_find_batch_stops_at_the_first_matching_page(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    older = batch_json("b-old", metadata={"k": "v"}, created_at=1_700_000_000)
    newer = batch_json("b-new", metadata={"k": "v", "x": "y"}, created_at=1_800_000_000)
    script.on(
        "GET",
        "/batches",
        ok({"data": [batch_json("b0"), older, newer], "has_more": True, "last_id": "b-new"}),
        ok({"data": [batch_json("b9", metadata={"k": "v"})], "has_more": False}),
    )
    hook = mock_hook()
    found = hook.find_batch(metadata={"k": "v"})
    assert found is not None
    assert found.id == "b-new"
    assert script.calls("GET", "/batches") == 1
    assert hook.find_batch(metadata={"k": "nope"}) is None


# -- the hook classes and the connection ------------------------------------------------------------------


@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_vendor_hooks_take_conn_type_and_name_from_the_registry(vendor: str) -> None:
    spec = REGISTRY[vendor]
    hook_class = VENDOR_HOOKS[spec.conn_type]
    assert getattr(batch_module, hook_class_name(spec)) is hook_class
    assert hook_class.conn_type == spec.conn_type == f"llmbatch_{vendor}"
    assert spec.display_name in hook_class.hook_name
    assert hook_class.conn_name_attr == "llmbatch_conn_id"
    assert hook_class.default_conn_name == "llmbatch_default"
    assert issubclass(hook_class, BatchHook)


def test_batch_hook_defaults() -> None:
    assert BatchHook.conn_type == "llmbatch_openai"
    assert BatchHook.hook_name == "LLM Batch (OpenAI-compatible)"


@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_connection_decides_the_vendor(vendor: str, connect: Callable[..., str]) -> None:
    assert VENDOR_HOOKS["llmbatch_openai"](connect(vendor)).vendor is REGISTRY[vendor]


def test_bad_connection_error_names_the_connection(connect: Callable[..., str]) -> None:
    conn_id = connect(password="")
    with pytest.raises(InvalidInputError, match=f"connection '{conn_id}': password"):
        BatchHook(conn_id).get_batch("b1")
    ok_, message = BatchHook(conn_id).test_connection()
    assert not ok_
    assert conn_id in message


def test_test_connection_lists_one_batch_and_never_raises(
    mock_hook: Callable[..., BatchHook], script: Script
) -> None:
    script.on("GET", "/batches", ok({"data": [], "has_more": False}), _error(401, "bad key"))
    hook = mock_hook()
    assert hook.test_connection() == (True, "Connected to OpenAI-compatible at http://vendor.test/api/v1")
    assert script.requests[0].url.params["limit"] == "1"
    ok_, message = hook.test_connection()
    assert not ok_
    assert "AuthenticationError: bad key" in message


def test_key_is_masked(connect: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    import airflow.sdk.log as sdk_log

    masked: list[Any] = []
    monkeypatch.setattr(sdk_log, "mask_secret", lambda value, name=None: masked.append(value))
    BatchHook(connect(password="sk-to-be-masked-123456")).vendor  # noqa: B018
    assert "sk-to-be-masked-123456" in masked
