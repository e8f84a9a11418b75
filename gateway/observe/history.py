"""The last 15 minutes, for the status page's charts: a ring of samples kept in memory.

Every ``INTERVAL`` seconds one sample records, per model, the requests that finished and the
tokens generated since the last one (as rates; a long stream counts in every sample it spans,
not all at its end), each hot worker's charged bytes, the budget, and each model's queue.
Requests come from the bus (``RequestEvent``: the live ``Outcome`` of each request in flight);
the rest is the supervisor's own snapshot. Each sample also goes out on the page's event stream (kind
``sample``, not kept in its lifecycle backlog), so open pages draw it live; a page that opens
later reads the ring from ``GET /admin/history``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.api.run import Outcome, RequestEvent

INTERVAL = 2.0
WINDOW = 15 * 60
HOT = ("starting", "loading", "ready", "draining", "idle", "stopping", "killing")


class History:
    def __init__(self, gw: Gateway, publish: Callable[[dict[str, Any]], None],
                 interval: float = INTERVAL, window: float = WINDOW):
        self.gw = gw
        self.publish = publish
        self.interval = interval
        self.samples: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(1, int(window / interval)))
        self._requests: collections.Counter[str] = collections.Counter()
        self._tokens: collections.Counter[str] = collections.Counter()
        self._live: dict[str, tuple[Outcome, int]] = {}  # in flight: (outcome, tokens counted)
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        gw.bus.subscribe(RequestEvent, self.on_request)

    def on_request(self, ev: RequestEvent) -> None:
        o = ev.outcome
        if ev.phase == "finished":
            _, counted = self._live.pop(o.request_id, (o, 0))
            self._requests[o.model] += 1
            self._tokens[o.model] += max(0, o.completion_tokens - counted)
        else:
            self._live.setdefault(o.request_id, (o, 0))

    def _count_streaming(self) -> None:
        for rid, (o, counted) in self._live.items():
            self._tokens[o.model] += max(0, o.completion_tokens - counted)
            self._live[rid] = (o, max(counted, o.completion_tokens))

    def sample(self) -> dict[str, Any]:
        """Take one sample now: rates since the previous one, levels as they are."""
        now = time.monotonic()
        dt = max(1e-3, now - self._last)
        self._last = now
        self._count_streaming()
        snap = self.gw.sup.snapshot()
        seen = set(self._requests) | set(self._tokens)
        rates = {m: {"rps": round(self._requests[m] / dt, 3), "tps": round(self._tokens[m] / dt, 2)}
                 for m in sorted(seen)}
        self._requests.clear()
        self._tokens.clear()
        queued: dict[str, int] = {}
        for m, slot in self.gw.sup.slots.items():
            if slot.waiters:
                queued[m] = len(slot.waiters)
        s = {"time": round(time.time(), 3), "rates": rates, "queued": queued,
             "budget": snap["budget_bytes"], "used": snap["used_bytes"],
             "memory": {("spare" if w["spare"] else w["model"]): w["charged_bytes"]
                        for w in snap["workers"] if w["state"] in HOT}}
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.publish(self.sample())

    async def start(self) -> None:
        self._last = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def document(self) -> dict[str, Any]:
        return {"interval": self.interval, "window": self.interval * (self.samples.maxlen or 0),
                "samples": list(self.samples)}
