"""
The connection form and the UI's Test button, through Airflow's own API app (FastAPI TestClient).

On Airflow 3.3.2 the Test button sends ``port: Number(connection.port)``, which is ``0`` for a connection
stored without a port. ``POST /api/v2/connections/test`` then takes the port for another destination and
refuses the test with a 400, unless the body carries a real key (the UI sends the masked ``***``). A
connection with a port passes; ``airflow connections test`` passes either way. The provider keeps the Port
field in the form for that reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from airflow_env import migrated_template

from airflow_provider_llmbatch.emulator import Emulator
from airflow_provider_llmbatch.get_provider_info import PORT_PLACEHOLDER
from airflow_provider_llmbatch.vendors import REGISTRY
from dev.local_airflow import LocalAirflow

ENV = {"AIRFLOW__CORE__TEST_CONNECTION": "Enabled", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}

# Creates each connection through the API, reads it back as the UI's connection list does, and posts the
# body the list's Test button builds from it (airflow/ui: ConnectionList's TestConnectionButton).
CHILD = textwrap.dedent(
    """
    import json, sys
    from fastapi.testclient import TestClient
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.routes.public import connections as route

    def ui_test_body(conn):
        extra = conn["extra"]
        return {
            "conn_type": conn["conn_type"],
            "connection_id": conn["connection_id"],
            "description": conn["description"] or "",
            "extra": "{}" if extra in ("", None) else extra,
            "host": conn["host"] or "",
            "login": conn["login"] or "",
            "password": conn["password"] or "",
            "port": int(conn["port"] or 0),  # Number(null) is 0 in the browser
            "schema": conn["schema"] or "",
        }

    connections = json.loads(sys.argv[1])
    out = {"refused": not route._same_endpoint(0, None), "meta": {}, "tests": {}}
    with TestClient(create_app("core")) as client:
        user = SimpleAuthManagerUser(username="admin", role="admin")
        client.headers["Authorization"] = "Bearer " + get_auth_manager().generate_jwt(user)
        meta = client.get("/ui/connections/hook_meta")
        meta.raise_for_status()
        out["meta"] = {m["connection_type"]: m["standard_fields"] for m in meta.json()}
        for conn in connections:
            created = client.post("/api/v2/connections", json=conn)
            assert created.status_code == 201, created.text
            listed = client.get("/api/v2/connections/" + conn["connection_id"]).json()
            body = ui_test_body(listed)
            answer = client.post("/api/v2/connections/test", json=body)
            out["tests"][conn["connection_id"]] = {
                "code": answer.status_code, "answer": answer.json(), "sent": body
            }
    print("RESULT " + json.dumps(out))
    """
)


def _connections(emulator: Emulator) -> list[dict[str, Any]]:
    connections = []
    for name, spec in REGISTRY.items():
        for port in (None, 443):
            connections.append(
                {
                    "connection_id": f"{name}_{'port' if port else 'noport'}",
                    "conn_type": spec.conn_type,
                    "host": emulator.base_url(name),  # carries its own port, which wins over the field
                    "password": emulator.api_key,
                    "port": port,
                }
            )
    return connections


@pytest.fixture(scope="module")
def button(
    tmp_path_factory: pytest.TempPathFactory, emulator_server: Emulator
) -> tuple[dict[str, Any], LocalAirflow, Emulator]:
    """Press every vendor's Test button, with and without a stored port, in Airflow's API app."""
    emulator_server.reset()
    airflow = migrated_template(tmp_path_factory).clone(tmp_path_factory.mktemp("conn-test") / "airflow-home")
    env = airflow.env(ENV)
    argv = [sys.executable, "-c", CHILD, json.dumps(_connections(emulator_server))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), airflow, emulator_server


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_form_shows_the_port_field(
    vendor: str, button: tuple[dict[str, Any], LocalAirflow, Emulator]
) -> None:
    fields = button[0]["meta"][REGISTRY[vendor].conn_type]
    assert fields["port"] == {"hidden": False, "title": None, "placeholder": PORT_PLACEHOLDER}
    assert fields["login"]["hidden"] is True
    assert fields["url_schema"]["hidden"] is True
    assert (fields["host"]["title"], fields["password"]["title"]) == ("Base URL", "API Key")


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_test_button_with_a_port_connects(
    vendor: str, button: tuple[dict[str, Any], LocalAirflow, Emulator]
) -> None:
    result, _, emulator = button
    test = result["tests"][f"{vendor}_port"]
    assert test["sent"]["password"] == "***"  # the UI never holds the key
    assert test["code"] == 200, test
    assert test["answer"]["status"] is True, test
    # The Base URL's own port is the one used, not the field's 443.
    assert test["answer"]["message"].endswith(f"at {emulator.base_url(vendor)}")


@pytest.mark.airflow
@pytest.mark.integration
@pytest.mark.parametrize("vendor", list(REGISTRY))
def test_test_button_without_a_port_is_refused_by_this_airflow(
    vendor: str, button: tuple[dict[str, Any], LocalAirflow, Emulator]
) -> None:
    result, _, _ = button
    test = result["tests"][f"{vendor}_noport"]
    assert test["sent"]["port"] == 0
    if result["refused"]:
        # The route's own rule: port 0 is not "the same endpoint" as a stored NULL, and "***" is no key.
        assert test["code"] == 400, test
        assert "differs from the stored connection" in test["answer"]["detail"]
    else:  # an Airflow that reads port 0 as no port (apache/airflow#73298)
        assert test["code"] == 200, test
        assert test["answer"]["status"] is True, test


@pytest.mark.airflow
@pytest.mark.integration
def test_cli_tests_a_connection_without_a_port(button: tuple[dict[str, Any], LocalAirflow, Emulator]) -> None:
    _, airflow, emulator = button
    before = emulator.stats("zhipu")["operations"].get("list_batches", 0)
    log = airflow.home / "logs" / "connections-test.log"
    status = airflow.run("connections", "test", "zhipu_noport", env=ENV, log_path=log, timeout=120)
    output = log.read_text(errors="replace")
    assert status == 0, output[-3000:]
    assert "Connection success!" in output
    assert emulator.api_key not in output
    assert emulator.stats("zhipu")["operations"]["list_batches"] == before + 1


def test_ui_builds_the_test_body_with_number_of_the_port() -> None:
    """The shipped UI still coerces the stored port with ``Number()`` (so a NULL port is sent as 0)."""
    assets = Path(str(files("airflow").joinpath("ui", "dist", "assets")))
    bundles = [path.read_text(errors="replace") for path in assets.glob("index-*.js")]
    assert bundles, f"no UI bundle under {assets}"
    # `p=Number(c.port)` ... `{conn_type:..,connection_id:..,...,port:p,...}`: the Test button's body.
    pattern = re.compile(
        r"(\w+)=Number\(\w+\.port\)[^}]{0,300}\{conn_type:\w+,connection_id:\w+,[^}]*port:\1[,}]"
    )
    assert any(pattern.search(bundle) for bundle in bundles)
