"""What every route shares: the ``Gateway`` (config, catalog view, supervisor, event bus) and the
small HTTP helpers (bounded body reads, msgspec JSON responses, OpenAI-shaped errors)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from mlx_supervisor.gateway.api.run import Outcome, RequestEvent
from mlx_supervisor.gateway.bus import Bus
from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor.loop import Supervisor
from mlx_supervisor.gateway.supervisor.spare import Launcher
from mlx_supervisor.shared.config import Config

if TYPE_CHECKING:
    from mlx_supervisor.gateway.observe.jobs import Jobs

log = logging.getLogger("mlx_supervisor.gateway")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class Gateway:
    @classmethod
    def build(cls, cfg: Config, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
              endpoint: str, launcher: Launcher | None = None) -> Gateway:
        """A gateway with its own bus and a supervisor that publishes on it."""
        bus = Bus()
        return cls(cfg, Supervisor(cfg, entries, aliases, budget, endpoint, bus, launcher), bus)

    def __init__(self, cfg: Config, sup: Supervisor, bus: Bus):
        self.cfg = cfg
        self.sup = sup
        # The one event bus, the gateway's: the supervisor's events and the requests'
        # (RequestEvent). Observers (metrics, status page, jobs, ledger) subscribe here; none is
        # process-global. The supervisor was built to publish on it.
        if sup.bus is not bus:
            raise ValueError("the supervisor must publish on the gateway's bus")
        self.bus = bus
        self.bus.subscribe(RequestEvent, self._forget_finished)
        self.active_ids: set[str] = set()  # request ids in flight (a stream and a ledger row each)
        self.warnings: list[str] = []
        # Parts that report their own health (the ledger): name -> a dict with ``status`` and,
        # when it is not "ok", ``error``; shown on /health and /metrics at each read.
        self.status_sources: dict[str, Callable[[], dict[str, Any]]] = {}
        self.image_fetcher: Callable[[list[str]], Any] | None = None
        self.routes: list[BaseRoute] = []  # plugins (metrics, status page, jobs) add theirs here
        self.reload: Callable[[], Awaitable[bool]] | None = None  # SIGHUP, pull/add/rm; False: refused
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []  # after the supervisor starts
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self.jobs: Jobs | None = None  # the jobs plugin (in-flight requests, the ledger), if attached

    def health(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Each status source's report, and the warnings: fixed ones plus any source not ok."""
        parts, warnings = {}, list(self.warnings)
        for name, fn in self.status_sources.items():
            try:
                parts[name] = fn()
            except Exception as e:  # a report must never take /health down
                parts[name] = {"status": "unknown", "error": f"{type(e).__name__}: {e}"}
            if parts[name].get("status") != "ok" and parts[name].get("error"):
                warnings.append(str(parts[name]["error"]))
        return parts, warnings

    def entry(self, name: object) -> Entry:
        """The catalog entry for an id or alias; 404 naming what exists otherwise."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "model must be a non-empty string", param="model", code="invalid_value")
        mid = self.sup.resolve(name)
        if mid is None:
            avail = ", ".join(sorted(self.sup.slots)) or "none"
            raise APIError(404, f"model {name[:200]!r} does not exist; available models: {avail}",
                           param="model", code="model_not_found")
        return self.sup.slots[mid].entry

    def _forget_finished(self, ev: RequestEvent) -> None:
        if ev.phase == "finished":
            self.active_ids.discard(ev.outcome.request_id)

    def observe(self, phase: str, outcome: Outcome) -> None:
        """Publish a request's move on the bus (the routes' one way to tell observers)."""
        self.bus.publish(RequestEvent(phase, outcome))

    async def fetch_images(self, urls: list[str]) -> list[bytes]:
        if self.image_fetcher is None:
            raise APIError(400, "this server cannot read images", param="messages", code="unsupported_value")
        result: list[bytes] = await self.image_fetcher(urls)
        return result


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise APIError(413, f"request body of {declared} bytes exceeds max_body_bytes ({limit})",
                               code="request_too_large")
        except ValueError:
            raise APIError(400, "bad Content-Length header", code="invalid_header") from None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds max_body_bytes ({limit})",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone (or cut at body_timeout) before the body ended
        raise APIError(499, "client disconnected before the body ended",
                       code="client_disconnected") from None
    return b"".join(chunks)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(data), status_code=status, headers=headers,
                    media_type="application/json")


ANTHROPIC_PREFIX = "/v1/messages"


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def error_response(e: APIError, scope: Any = None) -> Response:
    """``e`` as JSON in the shape of the API its request was for (``scope``'s path)."""
    headers = e.headers()
    rid = request_id_var.get()
    if rid != "-":
        headers["x-request-id"] = rid
    anthropic = scope is not None and is_anthropic(scope.get("path", ""))
    return Response(e.to_json(anthropic), status_code=e.status, headers=headers,
                    media_type="application/json")
