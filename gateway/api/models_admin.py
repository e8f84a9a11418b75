"""Operator routes that change the catalog: pull from the Hub, add and remove drop-in models.

- ``POST /admin/models/pull`` ``{"repo", "revision"?, "name"?, "pin"?}``: a refusal found from
  the Hub's listing (too large, not MLX, unknown repo) is a plain 4xx; otherwise the answer is
  an SSE stream of the pull (``started``, ``progress``, ``done``, ``error``).
- ``GET /admin/pulls`` (all of them), ``GET /admin/pulls/{id}`` (attach to its stream again),
  ``DELETE /admin/pulls/{id}`` (cancel: the stream ends with ``error``, code ``cancelled``).
- ``POST /admin/models`` ``{"name", "path" | "repo", "revision"?, "pin"?, "ttl"?}``: 201.
- ``DELETE /admin/models/{name}[?delete_files=true]``: unload, drop the file, apply.
Every change is applied to the running gateway at once, as a SIGHUP reload would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import psutil
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mlx_supervisor.gateway.api.gateway import Gateway, json_response, read_body
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.models import edit
from mlx_supervisor.gateway.models.pull import Pull, default_name, split_ref
from mlx_supervisor.gateway.models.pulls import Pulls, apply, config_dir, read_config
from mlx_supervisor.shared import dropins
from mlx_supervisor.shared.config import ModelConfig

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class PullBody(msgspec.Struct, forbid_unknown_fields=True):
    repo: str
    revision: str | None = None
    name: str | None = None
    pin: bool = False


class AddBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    path: str | None = None
    repo: str | None = None
    revision: str | None = None
    pin: bool = False
    ttl: float | None = None


def _decode(raw: bytes, cls: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return msgspec.json.decode(raw or b"{}", type=cls)
    except msgspec.ValidationError as e:
        text = str(e)
        param = text.rpartition("$.")[2].rstrip("`") if "$." in text else None
        raise APIError(400, f"invalid body: {text}", param=param, code="invalid_value") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"invalid JSON body: {e}", code="invalid_json") from None


class ModelRoutes:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.pulls = Pulls(gw)

    def _pull(self, request: Request) -> Pull:
        pull = self.pulls.by_id.get(request.path_params["id"])
        if pull is None:
            raise APIError(404, f"no pull {request.path_params['id'][:100]!r}", param="id",
                           code="pull_not_found")
        return pull

    async def pull(self, request: Request) -> Response:
        body = _decode(await read_body(request, 64 * 1024), PullBody)
        assert isinstance(body, PullBody)
        try:
            repo, at = split_ref(body.repo)
        except ValueError as e:
            raise APIError(400, str(e), param="repo", code="invalid_value") from None
        revision = body.revision or at
        name = body.name or default_name(repo)
        cfg = await asyncio.to_thread(read_config)
        edit.check_name(cfg, config_dir(), name, repo)  # a clash is refused before any download
        pull = self.pulls.start(repo, revision, body.name, body.pin)
        await self.pulls.wait_started(pull)
        return StreamingResponse(self.pulls.events(pull), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, "x-pull-id": pull.id})

    async def list_pulls(self, request: Request) -> Response:
        return json_response({"pulls": [p.summary() for p in self.pulls.by_id.values()]})

    async def pull_events(self, request: Request) -> Response:
        pull = self._pull(request)
        return StreamingResponse(self.pulls.events(pull), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, "x-pull-id": pull.id})

    async def cancel_pull(self, request: Request) -> Response:
        pull = self._pull(request)
        if pull.finished:
            raise APIError(409, f"pull {pull.id} already ended ({pull.state})", code="pull_finished")
        pull.cancel()
        return json_response({**pull.summary(), "state": "cancelling"}, status=202)

    async def add(self, request: Request) -> Response:
        body = _decode(await read_body(request, 64 * 1024), AddBody)
        assert isinstance(body, AddBody)
        if body.path is not None and not Path(body.path).expanduser().is_absolute():
            raise APIError(400, f"path must be absolute (the gateway's working directory is no "
                           f"anchor): {body.path[:200]!r}", param="path", code="invalid_value")
        model = ModelConfig(path=str(Path(body.path).expanduser().resolve()) if body.path else None,
                            repo=body.repo, revision=body.revision, pinned=body.pin, ttl=body.ttl)
        cdir = config_dir()
        cfg = await asyncio.to_thread(read_config)
        await asyncio.to_thread(edit.check_add, cfg, cdir, body.name, model,
                                psutil.virtual_memory().total)
        path = await asyncio.to_thread(dropins.write, cdir, body.name, model)
        try:
            await apply(self.gw)
        except APIError:
            dropins.remove(cdir, body.name)  # nothing half-applied stays behind
            await apply(self.gw)
            raise
        return json_response({"model": body.name, "file": str(path),
                              "state": self.gw.sup.model_info(body.name)["state"]}, status=201)

    async def remove(self, request: Request) -> Response:
        name = request.path_params["model"]
        delete = request.query_params.get("delete_files", "").lower() in ("1", "true", "yes")
        cdir = config_dir()
        cfg = await asyncio.to_thread(read_config)
        model = edit.removable(cfg, cdir, name)
        others = {n: m for n, m in cfg.models.items() if n != name}
        if delete:
            edit.check_delete(model, others)
        if name in self.gw.sup.slots:
            await self.gw.sup.unload(name)  # its requests finish, then the worker is gone
        dropins.remove(cdir, name)
        await apply(self.gw)
        files = None
        if delete:
            files = await asyncio.to_thread(edit.delete_cached, model, others)
        return json_response({"model": name, "removed": True, "files": files})


def attach(gw: Gateway) -> ModelRoutes:
    """Plugin entry point (see serve.PLUGINS)."""
    r = ModelRoutes(gw)

    async def stop_pulls() -> None:
        r.pulls.cancel_all()  # their partial files stay, for the next pull to resume

    gw.shutdown_hooks.append(stop_pulls)
    gw.routes += [
        Route("/admin/models/pull", r.pull, methods=["POST"]),
        Route("/admin/models", r.add, methods=["POST"]),
        Route("/admin/models/{model:path}", r.remove, methods=["DELETE"]),
        Route("/admin/pulls", r.list_pulls, methods=["GET"]),
        Route("/admin/pulls/{id}", r.pull_events, methods=["GET"]),
        Route("/admin/pulls/{id}", r.cancel_pull, methods=["DELETE"]),
    ]
    return r
