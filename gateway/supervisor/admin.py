"""The supervisor's operator commands (load, unload, cancel, reload, shutdown), kept beside the
loop they run in: each ``on_<command>`` is an event handler of ``Supervisor`` (a mixin, so the
loop still has one owner of all state)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor.model import (
    CancelCmd,
    LoadCmd,
    ReloadCmd,
    ShutdownCmd,
    Slot,
    UnloadCmd,
    Worker,
)
from mlx_supervisor.gateway.supervisor.states import HOT, State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.sizes import format_size

if TYPE_CHECKING:
    from mlx_supervisor.gateway.supervisor.model import Event
    from mlx_supervisor.gateway.supervisor.transport import Transport

log = logging.getLogger("mlx_supervisor.supervisor")


class AdminCommands:
    if TYPE_CHECKING:  # provided by Supervisor
        slots: dict[str, Slot]
        workers: dict[str, Worker]
        transport: Transport
        events: asyncio.Queue[Event]
        closing: bool
        budget: int
        max_models: int
        aliases: dict[str, str]

        def _failed_error(self, slot: Slot) -> APIError | None: ...
        def _admit(self, slot: Slot) -> None: ...
        def _drain(self, w: Worker, reason: str) -> None: ...
        def _stop(self, w: Worker, reason: str) -> None: ...
        def _spawn_task(self, coro: Any) -> None: ...
        def _fail_waiters(self, slot: Slot, err: APIError) -> None: ...

    def _post_load(self, model_id: str) -> None:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self.events.put_nowait(LoadCmd(model_id, None, fut))

    def on_loadcmd(self, ev: LoadCmd) -> None:
        slot = self.slots.get(ev.model_id)
        if slot is None:
            ev.fut.set_exception(APIError(404, f"model {ev.model_id!r} does not exist", code="model_not_found"))
            return
        if self.closing:
            ev.fut.set_exception(APIError(503, "server is shutting down", code="shutting_down"))
            return
        if ev.pin is not None:
            slot.pinned = ev.pin
        err = self._failed_error(slot)
        if err:
            ev.fut.set_exception(err)
            return
        if slot.worker is not None and slot.worker.state is State.READY:
            ev.fut.set_result(slot.worker)
            return
        slot.load_waiters.append(ev.fut)
        self._admit(slot)

    def on_unloadcmd(self, ev: UnloadCmd) -> None:
        slot = self.slots.get(ev.model_id)
        if slot is None:
            ev.fut.set_exception(APIError(404, f"model {ev.model_id!r} does not exist", code="model_not_found"))
            return
        slot.pinned = False
        slot.pending_admission = False
        # Whoever waits for this model to load would bring it straight back: tell them instead.
        self._fail_waiters(slot, APIError(503, f"model {ev.model_id!r} was unloaded by an operator",
                                          code="model_unloaded", retry_after=1))
        w = slot.worker
        if w is None:
            ev.fut.set_result(None)
            return
        self._drain(w, "unloaded by admin")
        self._spawn_task(self._await_exit(w, ev.fut))

    async def _await_exit(self, w: Worker, fut: asyncio.Future[Any]) -> None:
        while w.hot:
            await asyncio.sleep(0.05)
        if not fut.done():
            fut.set_result(None)

    def on_cancelcmd(self, ev: CancelCmd) -> None:
        # The route's Run sees a finished stream and so will not send Cancel: tell the worker here.
        for wid in [w for w in self.workers if ev.request_id in self.transport.streams_of(w)]:
            self.transport.send(wid, p.Cancel(id=ev.request_id))
        ok = self.transport.fail_request(ev.request_id, f"request {ev.request_id} was {ev.reason}",
                                         code="cancelled", status=499)
        for slot in self.slots.values():
            for w in list(slot.waiters):
                if w.request_id == ev.request_id:
                    slot.waiters.remove(w)
                    w.fut.set_exception(APIError(499, f"request {ev.request_id} was {ev.reason}",
                                                 code="cancelled"))
                    ok = True
        ev.fut.set_result(ok)

    def on_reloadcmd(self, ev: ReloadCmd) -> None:
        self.budget, self.max_models, self.aliases = ev.budget, ev.max_models, ev.aliases
        for mid in list(self.slots):
            if mid not in ev.entries:
                slot = self.slots[mid]
                self._fail_waiters(slot, APIError(404, f"model {mid!r} was removed", code="model_not_found"))
                if slot.worker:
                    self._drain(slot.worker, "removed from config")
                del self.slots[mid]
        for mid, e in ev.entries.items():
            if mid in self.slots:
                slot = self.slots[mid]
                changed = (slot.entry.path, slot.entry.kind) != (e.path, e.kind)
                slot.entry = e
                slot.pinned = e.pinned
                if changed and slot.worker:
                    self._drain(slot.worker, "config changed")
            else:
                self.slots[mid] = Slot(entry=e, pinned=e.pinned)
        log.info("config reloaded: %d models, budget %s", len(self.slots), format_size(self.budget))
        ev.fut.set_result(None)

    def on_shutdowncmd(self, ev: ShutdownCmd) -> None:
        self.closing = True
        for slot in self.slots.values():
            self._fail_waiters(slot, APIError(503, "server is shutting down", code="shutting_down"))
            slot.pending_admission = False
        for w in list(self.workers.values()):
            self._drain(w, "gateway shutting down")
        self._spawn_task(self._finish_shutdown(ev))

    async def _finish_shutdown(self, ev: ShutdownCmd) -> None:
        deadline = time.monotonic() + ev.grace
        while any(w.inflight for w in self.workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in list(self.workers.values()):
            n = self.transport.fail_worker(w.worker_id, "server shut down before the request finished",
                                           code="shutting_down")
            if n:
                log.warning("model=%s cancelled %d request(s) at shutdown", w.model_id, n)
            w.inflight = 0
            self._stop(w, "gateway shutting down")
        while any(w.state in HOT for w in self.workers.values()):
            await asyncio.sleep(0.05)
        if not ev.fut.done():
            ev.fut.set_result(None)
