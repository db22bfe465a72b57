"""Control endpoints under ``/_emulator/``: health, stats, reset, faults, latency, clock, forced statuses."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from airflow_provider_llmbatch.emulator import dialects
from airflow_provider_llmbatch.emulator.app import Runtime
from airflow_provider_llmbatch.emulator.faults import MAX_CLOCK_STEP, MAX_SECONDS, FaultRule, check_number
from airflow_provider_llmbatch.emulator.vendor_dialects import emulator_prefix

ADMIN_PREFIX = "/_emulator"


def _problem(message: str, status: int = 400) -> Response:
    return JSONResponse({"detail": message}, status_code=status)


async def _json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return await request.json()
    except ValueError:
        return None


def admin_mount(rt: Runtime) -> Mount:
    """Return the control routes; they sit outside every vendor's auth."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "vendors": rt.store.vendor_names()})

    async def vendors(request: Request) -> Response:
        root = str(request.base_url).rstrip("/")
        return JSONResponse({n: root + emulator_prefix(s) for n, s in rt.config.vendors.items()})

    async def stats(request: Request) -> Response:
        vendor = request.query_params.get("vendor")
        names = [vendor] if vendor else rt.store.vendor_names()
        if vendor and vendor not in rt.config.vendors:
            return _problem(f"unknown vendor {vendor!r}", 404)
        body: dict[str, Any] = {n: rt.store.stats(n) for n in names}
        body["_faults_hit"] = rt.faults.hits
        return JSONResponse(body)

    async def reset(request: Request) -> Response:
        rt.reset()
        return JSONResponse({"reset": True})

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            rt.faults.clear()
            return JSONResponse({"faults": 0})
        if request.method == "GET":
            return JSONResponse({"faults": [r.to_dict() for r in rt.faults.rules()]})
        data = await _json(request)
        items = data if isinstance(data, list) else [data]
        try:
            rules = [FaultRule.from_dict(item) for item in items]
        except (TypeError, ValueError) as exc:
            return _problem(f"bad fault rule: {exc}")
        for rule in rules:
            rt.faults.add(rule)
        return JSONResponse({"faults": len(rt.faults.rules())})

    async def latency(request: Request) -> Response:
        data = await _json(request)
        try:
            seconds = check_number(
                "seconds", data.get("seconds") if isinstance(data, dict) else None, high=MAX_SECONDS
            )
        except ValueError as exc:
            return _problem(f"expected {{'seconds': <number>}}: {exc}")
        rt.faults.latency = seconds
        return JSONResponse({"latency": rt.faults.latency})

    async def rate_limits(request: Request) -> Response:
        data = await _json(request)
        enabled = data.get("enabled") if isinstance(data, dict) else None
        if not isinstance(enabled, bool):
            return _problem("expected {'enabled': true|false}")
        rt.limiter.reset(enabled)
        return JSONResponse({"enabled": enabled})

    async def clock(request: Request) -> Response:
        data = await _json(request)
        try:
            # A clock step is data, not a wait: any finite step forward is fine.
            seconds = check_number(
                "advance", data.get("advance") if isinstance(data, dict) else None, high=MAX_CLOCK_STEP
            )
        except ValueError as exc:
            return _problem(f"expected {{'advance': <seconds>}}: {exc}")
        rt.clock.advance(seconds)
        return JSONResponse({"offset": rt.clock.offset, "now": rt.clock()})

    async def batches(request: Request) -> Response:
        vendor = request.path_params["vendor"]
        if vendor not in rt.config.vendors:
            return _problem(f"unknown vendor {vendor!r}", 404)
        spec = rt.config.vendors[vendor]
        return JSONResponse([dialects.render_batch(spec, b) for b in rt.store.list_batches(vendor)])

    async def status(request: Request) -> Response:
        vendor, batch_id = request.path_params["vendor"], request.path_params["batch_id"]
        data = await _json(request)
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            return _problem("expected {'status': <status>, 'hold': true|false}")
        hold = data.get("hold", True)
        if not isinstance(hold, bool):
            # bool("false") is True: a string would hold the batch where the caller meant to release it.
            return _problem(f"hold must be true or false, got {hold!r}")
        if vendor not in rt.config.vendors:
            return _problem(f"unknown vendor {vendor!r}", 404)
        try:
            batch = rt.store.force_status(vendor, batch_id, data["status"], hold=hold)
        except KeyError as exc:
            return _problem(str(exc.args[0]), 404)
        except ValueError as exc:
            return _problem(str(exc))
        return JSONResponse(dialects.render_batch(rt.config.vendors[vendor], batch))

    return Mount(
        ADMIN_PREFIX,
        routes=[
            Route("/health", health),
            Route("/vendors", vendors),
            Route("/stats", stats),
            Route("/reset", reset, methods=["POST"]),
            Route("/faults", faults, methods=["GET", "POST", "DELETE"]),
            Route("/latency", latency, methods=["POST"]),
            Route("/rate_limits", rate_limits, methods=["POST"]),
            Route("/clock", clock, methods=["POST"]),
            Route("/batches/{vendor}", batches),
            Route("/batches/{vendor}/{batch_id}/status", status, methods=["POST"]),
        ],
    )
