"""Operator routes: ``/admin/ps``, load (optionally pinned) and unload."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mlx_supervisor.gateway.api.gateway import Gateway, json_response, read_body
from mlx_supervisor.gateway.api.schemas import too_deep
from mlx_supervisor.gateway.errors import APIError


class LoadBody(msgspec.Struct):
    pin: bool | None = None


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def ps(request: Request) -> Response:
    return json_response(_gw(request).sup.snapshot())


async def load(request: Request) -> Response:
    gw = _gw(request)
    entry = gw.entry(request.path_params["model"])
    pin: bool | None = None
    q = request.query_params.get("pin")
    if q is not None:
        pin = q.lower() in ("1", "true", "yes")
    body = await read_body(request, 4096)
    if body.strip():
        try:
            b = msgspec.json.decode(body, type=LoadBody)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise APIError(400, f"invalid body: {e}", code="invalid_value") from None
        except RecursionError:
            raise too_deep() from None
        pin = b.pin if b.pin is not None else pin
    w = await gw.sup.load(entry.id, pin)
    return json_response({"model": entry.id, "state": w.state.value, "pid": w.pid,
                          "pinned": gw.sup.slots[entry.id].pinned, "load_seconds": w.load_seconds})


async def unload(request: Request) -> Response:
    gw = _gw(request)
    entry = gw.entry(request.path_params["model"])
    await gw.sup.unload(entry.id)
    return json_response({"model": entry.id, "state": "stopped"})


routes = [
    Route("/admin/ps", ps, methods=["GET"]),
    Route("/admin/models/{model:path}/load", load, methods=["POST"]),
    Route("/admin/models/{model:path}/unload", unload, methods=["POST"]),
]
