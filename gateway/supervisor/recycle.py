"""Recycling an evicted worker: an idle worker evicted to admit another model unloads its
model (``Unload``) instead of exiting, and becomes a warm spare that the admission adopts, so
a miss costs an in-process unload and load, not a process start (on CUDA a fresh interpreter
takes ~16 s). The pure rules are ``eviction.recyclable`` and ``eviction.keep_unloaded``.

While UNLOADING the worker is on its way out for admission (``LEAVING``): the admission waits
(PENDING) as it waits for a reap, and is retried on ``Unloaded``. The process is charged what
it held until it reports its post-unload footprint, then that. One that does not get back
near a model-free footprint, has been recycled ``recycle_workers`` times, is slow to unload or
exits while unloading is stopped, killed or reaped as any evicted worker.
"""

from __future__ import annotations

import logging

from mlx_supervisor.gateway.catalog import WORKER_BASELINE, Entry
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor.eviction import Reuse, keep_unloaded, recyclable
from mlx_supervisor.gateway.supervisor.model import Slot, Worker
from mlx_supervisor.gateway.supervisor.spare import SPARE
from mlx_supervisor.gateway.supervisor.states import State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")
UNLOAD_TIMEOUT = 10.0  # seconds an unload may take before the worker is killed


def _reuse(e: Entry) -> Reuse:
    return Reuse(e.kind, plain=not e.env and e.ranks <= 1)


def choose(core: c.Core, slot: Slot, victims: list[str]) -> Worker | None:
    """Of an admission's victims (model ids), the idle worker to recycle for ``slot``, if any."""
    for model_id in victims:
        old = core.slots.get(model_id)
        w = old.worker if old is not None else None
        if (old is not None and w is not None and w.state is State.READY and w.inflight == 0
                and not w.recycle and not w.spare
                and recyclable(_reuse(old.entry), _reuse(slot.entry), w.recycles,
                               core.cfg.recycle_workers)):
            return w
    return None


def begin(core: c.Core, w: Worker, reason: str) -> None:
    """Tell ``w`` to drop its model; its slot is free at once (the process is not its any more)."""
    slot = core.slots.get(w.model_id)
    if slot is not None and slot.worker is w:
        if w.ready_mono is not None:
            slot.served_seconds += core.now() - w.ready_mono
        slot.worker = None
    w.load_started = core.now()  # the unload timeout runs from here
    w.stop_reason = reason
    c.move(core, w, State.UNLOADING, reason)
    if not core.fx.send(w.worker_id, p.Unload(reason=reason)):
        c.stop(core, w, "could not be told to unload")


def on_unloaded(core: c.Core, w: Worker, msg: p.Unloaded) -> None:
    """Keep the process as a spare (charged its new footprint), or stop it."""
    if w.state is not State.UNLOADING:
        return
    w.recycles += 1
    fp = msg.memory.footprint
    if not keep_unloaded(fp, w.idle_floor, WORKER_BASELINE) or core.closing:
        why = "shutting down" if core.closing else (
            f"still holds {format_size(fp)} after unloading (floor {format_size(w.idle_floor)})")
        log.warning("model=%s pid=%s not recycled: %s", w.model_id, w.pid, why)
        return c.stop(core, w, f"not recycled: {why}")
    w.idle_floor = w.idle_floor or fp
    old = w.model_id
    w.memory, w.model_id, w.kind, w.spare, w.stop_reason = msg.memory, SPARE, "lm", True, None
    w.ready_mono = None
    core.spares.append(w)
    c.move(core, w, State.IDLE, f"unloaded {old} in {msg.unload_seconds:.2f}s, "
           f"holds {format_size(fp)}; recycled {w.recycles}x")
