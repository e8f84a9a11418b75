"""The live status page: ``/`` and ``/static/*`` (public, no build step), ``GET /admin/status``
(one JSON document the page polls), ``GET /admin/events`` (server-sent lifecycle events, plus
the charts' live samples and every pull's progress) and ``GET /admin/history`` (the charts' last 15 minutes, history.py).

Events come from the gateway's bus (supervisor events and state transitions) into one ring
buffer of the last ``RING`` events. A new subscriber gets the backlog first (only what it has not seen, when
it reconnects with ``Last-Event-ID``), then live events. Each subscriber has a bounded queue: a
browser that stops reading is cut off instead of growing our memory; its ``fetch`` reconnects
and resumes from its last id.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlx_supervisor.gateway.api.gateway import Gateway, json_response
from mlx_supervisor.gateway.models.pull import PullEvent
from mlx_supervisor.gateway.observe.history import History
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.states import State

STATIC = Path(__file__).parent / "static"
RING = 200
SUBSCRIBER_QUEUE = 256
KEEPALIVE = 15.0  # seconds between SSE comments, which also reveal a vanished client
POLL = 1.0  # how often an idle stream checks whether the gateway is shutting down
# Events worth a line on the page; per-request Queued/Granted would drown the rest.
SHOWN = (ev.Spawning, ev.WorkerReady, ev.Evicted, ev.TtlExpired, ev.WorkerStopped, ev.WorkerCrashed)
# Transitions the other events do not already report.
TRANSITION_KINDS = {State.LOADING.value: "loading", State.DRAINING.value: "draining"}


class Subscriber:
    def __init__(self, size: int):
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.dropped = False


class EventHub:
    """Ring buffer plus fan-out. Called only from the event loop's thread (the bus)."""

    def __init__(self, size: int = RING, queue_size: int = SUBSCRIBER_QUEUE):
        self.ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self._seq = itertools.count(1)

    def publish(self, kind: str, **data: Any) -> dict[str, Any]:
        ev = {"id": next(self._seq), "time": time.time(), "kind": kind,
              **{k: v for k, v in data.items() if v is not None}}
        self.ring.append(ev)
        self._fan_out(ev)
        return ev

    def broadcast(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send to the open streams only, outside the backlog (chart samples: the backlog is for
        lifecycle events, and the samples have their own ring in history.py)."""
        ev = {"time": time.time(), **data, "id": next(self._seq), "kind": kind}
        self._fan_out(ev)
        return ev

    def _fan_out(self, ev: dict[str, Any]) -> None:
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(ev)
            except asyncio.QueueFull:
                sub.dropped = True
                self.subscribers.discard(sub)

    def subscribe(self, after: int = 0) -> tuple[Subscriber, list[dict[str, Any]]]:
        """A new subscriber and the backlog it has not seen (events with id > ``after``)."""
        sub = Subscriber(self.queue_size)
        self.subscribers.add(sub)
        return sub, [e for e in self.ring if e["id"] > after]

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)


def _sse(ev: dict[str, Any]) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev["id"], ev["kind"].encode(), msgspec.json.encode(ev))


class StatusPage:
    def __init__(self, gw: Gateway, hub: EventHub):
        self.gw = gw
        self.hub = hub

    def on_event(self, e: ev.SupervisorEvent) -> None:
        if isinstance(e, SHOWN):
            self.hub.publish(e.kind, **msgspec.structs.asdict(e))
        elif isinstance(e, ev.Transitioned) and e.new in TRANSITION_KINDS:
            self.hub.publish(TRANSITION_KINDS[e.new], model=e.model, pid=e.pid, reason=e.reason,
                             previous=e.old)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def status(self, request: Request) -> Response:
        sup = self.gw.sup
        models = [{"id": mid, **sup.model_info(mid), "ttl": slot.entry.ttl,
                   "queued": len(slot.waiters)} for mid, slot in sorted(sup.slots.items())]
        last = self.hub.ring[-1]["id"] if self.hub.ring else 0
        return json_response({**sup.snapshot(), "now": time.time(), "models": models,
                              "last_event_id": last, "warnings": self.gw.warnings})

    async def events(self, request: Request) -> Response:
        try:
            after = int(request.headers.get("last-event-id") or request.query_params.get("after") or 0)
        except ValueError:
            after = 0
        sub, backlog = self.hub.subscribe(after)
        return StreamingResponse(self._stream(sub, backlog), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _stream(self, sub: Subscriber, backlog: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n" + b"".join(_sse(e) for e in backlog)
            idle = 0.0
            while not self.gw.sup.closing:
                try:
                    ev = await asyncio.wait_for(sub.queue.get(), POLL)
                except asyncio.TimeoutError:
                    idle += POLL
                    if idle >= KEEPALIVE:
                        idle = 0.0
                        yield b": keepalive\n\n"
                    continue
                idle = 0.0
                yield _sse(ev)
                if sub.dropped and sub.queue.empty():
                    return  # too slow: the client reconnects with Last-Event-ID and resumes
        finally:
            self.hub.unsubscribe(sub)


def attach(gw: Gateway) -> StatusPage:
    """Plugin entry point (see serve.PLUGINS)."""
    page = StatusPage(gw, EventHub())
    gw.bus.subscribe(ev.SupervisorEvent, page.on_event)
    hist = History(gw, lambda sample: page.hub.broadcast("sample", sample))
    gw.bus.subscribe(PullEvent, lambda e: page.hub.broadcast("pull", {"pull": e.data}))
    gw.startup_hooks.append(hist.start)
    gw.shutdown_hooks.append(hist.stop)

    async def history(request: Request) -> Response:
        return json_response(hist.document())

    gw.routes += [
        Route("/", page.index, methods=["GET"]),
        Route("/admin/status", page.status, methods=["GET"]),
        Route("/admin/events", page.events, methods=["GET"]),
        Route("/admin/history", history, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return page
