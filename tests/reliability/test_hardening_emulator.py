"""
Hardening, the emulator's controls: a value it cannot use is a 400 naming the field, and nothing is applied.

Users drive the emulator's faults, latency, clock, rate limits and forced statuses from their own tests,
over HTTP (``/_emulator/...``) or in Python. Every control is fed values hypothesis generates (any JSON,
``NaN`` and ``Infinity`` tokens included, as Python's ``json`` writes them); the expectation is computed
from the documented ranges, and after a refusal the emulator's state is compared with what it was.
Unit tests: ``tests/emulator/test_emulator_admin.py`` and ``test_emulator_faults.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from relkit import examples, write_request_file

from airflow_provider_llmbatch.emulator import Emulator, FaultRule
from airflow_provider_llmbatch.emulator.faults import (
    FAULT_KINDS,
    MAX_CLOCK_STEP,
    MAX_SECONDS,
    OPERATIONS,
)
from airflow_provider_llmbatch.emulator.machine import STATUSES
from airflow_provider_llmbatch.hooks.batch import BatchHook
from airflow_provider_llmbatch.vendors import REGISTRY

pytestmark = pytest.mark.integration

ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([0, 1, -1, 0.5, 1.5, 3600, 3601, 1e9, 1e10, 10**400, "5", "500", "nan", "Infinity"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=3,
)


def number_in(value: Any, high: float) -> bool:
    """Whether ``value`` is a JSON number from 0 to ``high`` (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (0 <= value <= high) if isinstance(value, int) else (math.isfinite(value) and 0 <= value <= high)


def whole_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


RULE_FIELDS = ["kind", "vendor", "operation", "times", "probability", "delay", "retry_after", "after_bytes"]


def rule_problem(rule: Any) -> str | None:
    """Return the field a fault rule is refused for (the first, in the order they are checked), or None."""
    if not isinstance(rule, dict):
        return "rule"
    if set(rule) - set(RULE_FIELDS):
        return "unknown fault rule fields"
    checks = {
        "kind": lambda v: str(v) in FAULT_KINDS,
        "vendor": lambda v: v is None or isinstance(v, str),
        "operation": lambda v: v is None or (isinstance(v, str) and v in OPERATIONS),
        "probability": lambda v: v is None or number_in(v, 1.0),
        "times": whole_or_none,
        "after_bytes": whole_or_none,
        "delay": lambda v: number_in(v, MAX_SECONDS),
        "retry_after": lambda v: number_in(v, MAX_SECONDS),
    }
    if "kind" not in rule:
        return "kind"
    return next((name for name, ok in checks.items() if name in rule and not ok(rule[name])), None)


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    """A fault rule with each field valid, absent or anything at all."""
    valid = {
        "kind": st.sampled_from(sorted(FAULT_KINDS)) | st.sampled_from([500, 503]),
        "vendor": st.none() | st.sampled_from(["openai", "zhipu"]),
        "operation": st.none() | st.sampled_from(sorted(OPERATIONS)),
        "times": st.none() | st.integers(0, 5),
        "probability": st.none() | st.floats(0, 1),
        "delay": st.floats(0, 5) | st.integers(0, 5),
        "retry_after": st.floats(0, 5),
        "after_bytes": st.none() | st.integers(0, 100),
    }
    rule = {"kind": draw(valid["kind"])}
    for name in draw(st.lists(st.sampled_from(RULE_FIELDS), max_size=4, unique=True)):
        rule[name] = draw(st.sampled_from([valid[name]] * 2 + [ANY_JSON]).flatmap(lambda s: s))
    if draw(st.integers(0, 9)) == 0:
        rule[draw(st.sampled_from(["kinds", "latency", ""]))] = 1
    if draw(st.integers(0, 9)) == 0:
        del rule["kind"]
    return rule


@pytest.fixture
def admin(emulator: Emulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{emulator.url}/_emulator", timeout=10) as client:
        yield client


@pytest.fixture
def batch_id(emulator: Emulator, rel_conn: Any, tmp_path: Any) -> str:
    with BatchHook(rel_conn("openai")) as hook:
        uploaded = hook.upload_file(write_request_file(tmp_path / "requests.jsonl", REGISTRY["openai"], 2))
        return hook.create_batch(input_file_id=uploaded.id).id


def _state(emulator: Emulator, admin: httpx.Client, batch_id: str) -> dict[str, Any]:
    return {
        "latency": emulator.runtime.faults.latency,
        "clock offset": emulator.clock.offset,
        "faults": admin.get("/faults").json()["faults"],
        "rate limits": emulator.runtime.limiter.enabled,
        "status": emulator.batch("openai", batch_id)["status"],
    }


def _post(admin: httpx.Client, path: str, payload: Any) -> httpx.Response:
    # As Python's json writes it: NaN and Infinity tokens included.
    body = json.dumps(payload, allow_nan=True)
    return admin.post(path, content=body, headers={"Content-Type": "application/json"})


def _expect(control: str, payload: Any) -> str | None:
    """Return the field a control's payload is refused for, or None when it is applied."""
    field = {"latency": "seconds", "clock": "advance", "rate_limits": "enabled"}.get(control)
    if field is not None:
        value = payload.get(field) if isinstance(payload, dict) else None
        ok = {
            "seconds": lambda v: number_in(v, MAX_SECONDS),
            "advance": lambda v: number_in(v, MAX_CLOCK_STEP),
            "enabled": lambda v: isinstance(v, bool),
        }[field](value)
        return None if ok else field
    if control == "status":
        if not isinstance(payload, dict) or not isinstance(payload.get("status"), str):
            return "status"
        if not isinstance(payload.get("hold", True), bool):
            return "hold"
        return None if payload["status"] in STATUSES else "status"
    items = payload if isinstance(payload, list) else [payload]
    return next((p for p in map(rule_problem, items) if p is not None), None)


PAYLOADS = {
    "latency": st.fixed_dictionaries({"seconds": st.floats(0, MAX_SECONDS) | st.integers(0, 3600) | ANY_JSON})
    | st.fixed_dictionaries({}, optional={"secs": ANY_JSON})
    | ANY_JSON,
    "clock": st.fixed_dictionaries(
        {}, optional={"advance": ANY_JSON | st.floats(0, 1e6) | st.integers(0, 10**6)}
    ),
    "rate_limits": st.fixed_dictionaries({}, optional={"enabled": ANY_JSON | st.booleans()}),
    "status": st.fixed_dictionaries(
        {"status": st.sampled_from(sorted(STATUSES)) | ANY_JSON},
        optional={"hold": st.booleans() | ANY_JSON | st.sampled_from(["false", "no", 0])},
    ),
    "faults": rules() | st.lists(rules(), min_size=1, max_size=3),
}
PYTHON_PAYLOADS = {
    "latency": st.fixed_dictionaries({"seconds": st.floats(0, MAX_SECONDS) | ANY_JSON}),
    "clock": st.fixed_dictionaries({"advance": st.floats(0, 1e6) | ANY_JSON}),
    "faults": rules(),
}


@pytest.mark.parametrize("control", sorted(PAYLOADS))
@examples(60)
@given(data=st.data())
def test_a_control_value_the_emulator_cannot_use_is_refused_and_nothing_applied(
    control: str, data: st.DataObject, emulator: Emulator, admin: httpx.Client, batch_id: str
) -> None:
    payload = data.draw(PAYLOADS[control])
    emulator.force_status("openai", batch_id, "in_progress")  # held: its status moves only when forced
    refused_for = _expect(control, payload)
    event(f"{control}: {'refused' if refused_for else 'applied'}")
    before = _state(emulator, admin, batch_id)
    path = f"/batches/openai/{batch_id}/status" if control == "status" else f"/{control}"
    answer = _post(admin, path, payload)
    after = _state(emulator, admin, batch_id)
    if refused_for is not None:
        assert answer.status_code == 400, (payload, answer.text)
        if refused_for != "rule":
            assert refused_for in answer.json()["detail"], answer.text
        assert after == before, "nothing applied"
        return
    assert answer.status_code == 200, (payload, answer.text)
    if control == "latency":
        assert after["latency"] == payload["seconds"]
    elif control == "clock":
        assert after["clock offset"] == before["clock offset"] + payload["advance"]
    elif control == "rate_limits":
        assert after["rate limits"] is payload["enabled"]
    elif control == "status":  # as forced (released with hold false, it may have moved on since)
        assert answer.json()["status"] == payload["status"]
    else:
        added = after["faults"][len(before["faults"]) :]
        given_rules = payload if isinstance(payload, list) else [payload]
        assert added == [FaultRule.from_dict(rule).to_dict() for rule in given_rules]
        assert [r["kind"] for r in added] == [str(r["kind"]) for r in given_rules]
    emulator.clear_faults()  # applied latency or faults must not slow the next example


@pytest.mark.parametrize("control", sorted(PYTHON_PAYLOADS))
@examples(40)
@given(data=st.data())
def test_the_python_controls_refuse_what_the_http_ones_refuse(
    control: str, data: st.DataObject, emulator: Emulator
) -> None:
    payload = data.draw(PYTHON_PAYLOADS[control])
    refused_for = _expect(control, payload)
    event(f"{control}: {'refused' if refused_for else 'applied'}")
    before = (emulator.runtime.faults.latency, emulator.clock.offset, len(emulator.runtime.faults.rules()))

    def apply() -> None:
        if control == "latency":
            emulator.set_latency(payload.get("seconds"))
        elif control == "clock":
            emulator.advance_clock(payload.get("advance"))
        else:
            emulator.add_fault(FaultRule.from_dict(payload))

    if refused_for is None:
        apply()
        emulator.clear_faults()
        return
    with pytest.raises((ValueError, TypeError)) as info:
        apply()
    named = {"seconds": "latency", "advance": "seconds"}.get(refused_for, refused_for)  # the Python names
    if refused_for != "rule":
        assert named in str(info.value)
    assert (
        emulator.runtime.faults.latency,
        emulator.clock.offset,
        len(emulator.runtime.faults.rules()),
    ) == before
