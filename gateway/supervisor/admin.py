"""Handlers for the operator's commands: load, unload, cancel, reload, shutdown. Each answers
its command's future from inside the loop; a command that waits for a reap (unload, shutdown)
is answered by the reap itself (``lifecycle.on_exited``), so no wait here polls."""

from __future__ import annotations

import logging

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import admission
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor.model import (
    CancelCmd,
    LoadCmd,
    ReloadCmd,
    ShutdownCmd,
    Slot,
    UnloadCmd,
)
from mlx_supervisor.gateway.supervisor.states import SlotState, State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")


def on_loadcmd(core: c.Core, e: LoadCmd) -> None:
    slot = core.slots.get(e.model_id)
    if slot is None:
        return e.fut.set_exception(c.not_found(e.model_id))
    if core.closing:
        return e.fut.set_exception(APIError(503, "server is shutting down", code="shutting_down"))
    if e.pin is not None:
        slot.pinned = e.pin
    err = c.failed_error(core, slot)
    if err:
        return e.fut.set_exception(err)
    if slot.worker is not None and slot.worker.state is State.READY:
        return e.fut.set_result(slot.worker)
    slot.load_waiters.append(e.fut)
    admission.admit(core, slot)


def on_unloadcmd(core: c.Core, e: UnloadCmd) -> None:
    slot = core.slots.get(e.model_id)
    if slot is None:
        return e.fut.set_exception(c.not_found(e.model_id))
    slot.pinned = False
    if slot.pending:
        c.move_slot(slot, SlotState.COLD, "unloaded by admin")
    # Whoever waits for this model to load would bring it straight back: tell them instead.
    c.fail_waiters(slot, APIError(503, f"model {e.model_id!r} was unloaded by an operator",
                                  code="model_unloaded", retry_after=1))
    w = slot.worker
    if w is None:
        return e.fut.set_result(None)
    w.exit_waiters.append(e.fut)  # answered by its reap
    c.drain(core, w, "unloaded by admin")


def on_cancelcmd(core: c.Core, e: CancelCmd) -> None:
    fx = core.fx
    # The route's Run sees a finished stream and so will not send Cancel: tell the worker here.
    for wid in [w for w in core.workers if e.request_id in fx.streams_of(w)]:
        fx.send(wid, p.Cancel(id=e.request_id))
    message = f"request {e.request_id} was {e.reason}"
    ok = fx.fail_request(e.request_id, message, "cancelled", 499)
    for slot in core.slots.values():
        for w in list(slot.waiters):
            if w.request_id == e.request_id:
                slot.waiters.remove(w)
                w.fut.set_exception(APIError(499, message, code="cancelled"))
                ok = True
    e.fut.set_result(ok)


def on_reloadcmd(core: c.Core, e: ReloadCmd) -> None:
    core.budget, core.max_models, core.aliases = e.budget, e.max_models, e.aliases
    for mid in [m for m in core.slots if m not in e.entries]:
        slot = core.slots.pop(mid)
        c.fail_waiters(slot, APIError(404, f"model {mid!r} was removed", code="model_not_found"))
        if slot.worker:
            c.drain(core, slot.worker, "removed from config")
    for mid, entry in e.entries.items():
        slot = core.slots.get(mid)
        if slot is None:
            core.slots[mid] = Slot(entry=entry, pinned=entry.pinned)
            continue
        changed = (slot.entry.path, slot.entry.kind) != (entry.path, entry.kind)
        slot.entry = entry
        slot.pinned = entry.pinned
        if changed and slot.worker:
            c.drain(core, slot.worker, "config changed")
    log.info("config reloaded: %d models, budget %s", len(core.slots), format_size(core.budget))
    e.fut.set_result(None)


def on_shutdowncmd(core: c.Core, e: ShutdownCmd) -> None:
    core.closing = True
    for slot in core.slots.values():
        c.fail_waiters(slot, APIError(503, "server is shutting down", code="shutting_down"))
        if slot.pending:
            c.move_slot(slot, SlotState.COLD, "shutting down")
    for w in list(core.workers.values()):
        c.drain(core, w, "gateway shutting down")
    core.shutdown = e
    core.shutdown_deadline = core.now() + e.grace
    check_shutdown(core)


def check_shutdown(core: c.Core) -> None:
    """Shutdown's next step, after every release, reap and tick: once nothing is in flight (or
    ``grace`` is over) end what is left and stop every worker; answer when all are reaped."""
    e = core.shutdown
    if e is None:
        return
    inflight = any(w.inflight for w in core.workers.values())
    if not core.shutdown_forced and (not inflight or core.now() >= core.shutdown_deadline):
        core.shutdown_forced = True
        for w in list(core.workers.values()):
            n = core.fx.fail_streams(w.worker_id, "server shut down before the request finished",
                                     code="shutting_down")
            if n:
                log.warning("model=%s cancelled %d request(s) at shutdown", w.model_id, n)
            w.inflight = 0
            c.stop(core, w, "gateway shutting down")
    if core.shutdown_forced and not core.workers and not e.fut.done():
        e.fut.set_result(None)
