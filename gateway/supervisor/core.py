"""The supervisor's state (``Core``) and the small steps every handler shares: moving a worker
or a slot, granting, failing waiters, recording a crash, draining, stopping, killing.

Only the loop's task calls these. They touch nothing outside ``Core`` but through ``core.fx``
(the ``Effects``), and read time only through ``core.now()``, so a test drives them with a fake
``Effects`` and a fake clock.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.effects import Effects
from mlx_supervisor.gateway.supervisor.model import (
    Lease,
    Release,
    ShutdownCmd,
    Slot,
    Waiter,
    Worker,
)
from mlx_supervisor.gateway.supervisor.states import (
    EXITING,
    SlotState,
    State,
    slot_transition,
    transition,
)
from mlx_supervisor.shared.config import Config

log = logging.getLogger("mlx_supervisor.supervisor")


@dataclass(eq=False)
class Core:
    cfg: Config
    budget: int
    max_models: int
    aliases: dict[str, str]
    slots: dict[str, Slot]
    fx: Effects
    clock: Callable[[], float] = time.monotonic
    workers: dict[str, Worker] = field(default_factory=dict)  # worker_id -> worker, until reaped
    closing: bool = False
    spares: list[Worker] = field(default_factory=list)  # the warm spares (warm_spares of them)
    spare_retry_at: float = 0.0
    last_ping: float = 0.0
    shutdown: ShutdownCmd | None = None
    shutdown_deadline: float = 0.0
    shutdown_forced: bool = False  # in-flight requests ended, every worker told to stop
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    held: Callable[[], int] = lambda: 0
    """Bytes held by processes that are not workers (the zygote: ``Launcher.held_bytes``)."""

    @classmethod
    def build(cls, cfg: Config, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
              fx: Effects, clock: Callable[[], float] = time.monotonic) -> Core:
        slots = {m: Slot(entry=e, pinned=e.pinned) for m, e in entries.items()}
        return cls(cfg, budget, cfg.max_models, aliases, slots, fx, clock)

    def now(self) -> float:
        return self.clock()

    @property
    def spare(self) -> Worker | None:
        """The first warm spare, if any (read-only; ``spare.py`` keeps the pool)."""
        return self.spares[0] if self.spares else None

    def used_bytes(self) -> int:
        """The ledger: bytes of every process not yet reaped (measured, else estimated)."""
        return sum(w.bytes for w in self.workers.values()) + self.held()

    def new_worker(self, model_id: str, prefix: str, e: Entry | None, estimate: int, kind: str,
                   spare: bool = False) -> Worker:
        now = self.now()
        w = Worker(model_id=model_id, worker_id=f"{prefix}#{next(self.ids)}", estimate=estimate,
                   kind=kind, spare=spare, load_started=now, last_used_mono=now, last_heartbeat=now,
                   context_length=e.context_length if e else 0,
                   reserved=e.reserved if e else False)
        self.workers[w.worker_id] = w
        self.fx.allow(w.worker_id)
        return w


def move(core: Core, w: Worker, new: State, reason: str) -> None:
    old = transition(w, new, reason)
    core.fx.emit(ev.Transitioned(model=w.model_id, worker_id=w.worker_id, pid=w.pid, old=old.value,
                                 new=new.value, reason=reason))


def move_slot(slot: Slot, new: SlotState, reason: str) -> None:
    slot_transition(slot, new, reason)


def shutting_down() -> APIError:
    return APIError(503, "server is shutting down", code="shutting_down", retry_after=5)


def not_found(model_id: str) -> APIError:
    return APIError(404, f"model {model_id!r} does not exist", code="model_not_found")


# ---------------------------------------------------------------- requests


def grant(core: Core, slot: Slot, worker: Worker, w: Waiter) -> None:
    worker.inflight += 1
    worker.last_used_mono = core.now()
    slot.last_used_wall = time.time()
    fx = core.fx
    lease = Lease(slot.entry.id, worker.worker_id, w.request_id, worker.pid, worker.kind,
                  worker.context_length, _release=lambda lease: fx.post(Release(lease)))
    w.fut.set_result(lease)
    core.fx.emit(ev.Granted(model=slot.entry.id, request_id=w.request_id, pid=worker.pid,
                            waited=core.now() - w.since))


def pump(core: Core, slot: Slot) -> None:
    """Grant queued waiters while the slot's ready worker has room."""
    worker = slot.worker
    while (worker and worker.state is State.READY and slot.waiters
           and worker.inflight - worker.parked < slot.entry.max_concurrency):
        w = slot.waiters.popleft()
        if not w.fut.done():
            grant(core, slot, worker, w)


def fail_waiters(slot: Slot, err: APIError) -> None:
    while slot.waiters:
        w = slot.waiters.popleft()
        if not w.fut.done():
            w.fut.set_exception(err)
    for f in slot.load_waiters:
        if not f.done():
            f.set_exception(err)
    slot.load_waiters.clear()


def failed_error(core: Core, slot: Slot) -> APIError | None:
    left = slot.failed_until - core.now()
    if slot.state is not SlotState.FAILED or left <= 0:
        return None
    return APIError(503, f"model {slot.entry.id!r} failed and is backing off for {left:.0f}s; "
                    f"last error: {slot.last_error}", code="model_failed", retry_after=left)


def record_crash(core: Core, slot: Slot, reason: str) -> None:
    now, cfg = core.now(), core.cfg
    slot.last_error = reason
    slot.crashes.append(now)
    while slot.crashes and now - slot.crashes[0] > cfg.crash_window:
        slot.crashes.popleft()
    n = len(slot.crashes)
    if n >= cfg.max_crashes:
        backoff = min(5.0 * 2 ** (n - cfg.max_crashes), 300.0)
        slot.failed_until = now + backoff
        move_slot(slot, SlotState.FAILED, f"{n} crashes in {cfg.crash_window:g}s")
        log.error("model=%s failed %d times in %.0fs; backing off %.0fs: %s", slot.entry.id, n,
                  cfg.crash_window, backoff, reason)
    elif n >= 2:
        slot.respawn_at = now + min(0.5 * 2 ** (n - 2), 10.0)


# ---------------------------------------------------------------- stopping


def drain(core: Core, w: Worker, reason: str) -> None:
    """No new requests; stop once the in-flight ones finish."""
    if w.state in (State.STARTING, State.IDLE, State.LOADING, State.READY):
        move(core, w, State.DRAINING, reason)
        w.stop_reason = reason
    if w.inflight == 0:
        stop(core, w, reason)


def stop(core: Core, w: Worker, reason: str) -> None:
    """Start the bounded stop path (at once, or as soon as the process exists)."""
    if w.state in EXITING or not w.hot:
        return
    w.stop_reason = w.stop_reason or reason
    move(core, w, State.STOPPING, w.stop_reason)
    if w.proc is not None:
        core.fx.stop(w)


def kill(core: Core, w: Worker, reason: str) -> None:
    """A worker we no longer trust (hung, failed load): SIGKILL now, crashed when reaped."""
    if w.state is State.KILLING or not w.hot:
        return
    w.kill_reason = w.kill_reason or reason
    log.error("model=%s pid=%s killing: %s", w.model_id, w.pid, reason)
    w.killed_in = w.state
    move(core, w, State.KILLING, reason)
    if w.proc is not None:
        core.fx.kill(w)
