"""The supervisor's periodic upkeep, run on every ``Tick`` inside the loop: heartbeat loss,
load timeouts, idle TTL, pings, backoff expiry, memory growth over the budget, and the warm
spare (a worker with its imports done, waiting for a model). A mixin of ``Supervisor``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from mlx_supervisor.gateway.catalog import WORKER_BASELINE, Entry
from mlx_supervisor.gateway.supervisor.eviction import Holder, Usage, plan_admission, relieve
from mlx_supervisor.gateway.supervisor.model import Slot, Tick, Worker
from mlx_supervisor.gateway.supervisor.states import State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config
from mlx_supervisor.shared.sizes import format_size

if TYPE_CHECKING:
    from mlx_supervisor.gateway.supervisor.transport import Transport

log = logging.getLogger("mlx_supervisor.supervisor")
SPARE = "(spare)"  # model id of the warm spare: imports done, no model yet
SPARE_KINDS = frozenset({"lm", "vlm", "embeddings"})


class Upkeep:
    if TYPE_CHECKING:  # provided by Supervisor
        cfg: Config
        slots: dict[str, Slot]
        workers: dict[str, Worker]
        transport: Transport
        closing: bool
        budget: int
        max_models: int
        spare: Worker | None
        _spare_retry_at: float
        _last_ping: float
        _ids: Any

        def used_bytes(self) -> int: ...
        def _admit(self, slot: Slot) -> None: ...
        def _drain(self, w: Worker, reason: str) -> None: ...
        def _kill(self, w: Worker, reason: str) -> None: ...
        def _emit(self, kind: str, **data: Any) -> None: ...
        def _holders(self, exclude: str) -> list[Holder]: ...
        def _spawn_task(self, coro: Any) -> None: ...
        async def _spawn_process(self, worker: Worker, e: Entry | None) -> None: ...

    def on_tick(self, ev: Tick) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.proc is None or w.proc.proc.returncode is not None:
                continue
            silent = now - w.last_heartbeat
            if w.kill_reason and w.state is not State.DRAINING:
                if silent > 1.0:  # a failed loader that did not exit by itself
                    self._kill(w, w.kill_reason)
            elif w.state is State.STARTING:
                # No Hello yet: the interpreter is still importing (15 s for mlx_lm on some
                # machines), so only load_timeout applies, not the heartbeat timeout.
                if now - w.last_used > self.cfg.load_timeout:
                    self._kill(w, f"did not start within load_timeout ({self.cfg.load_timeout:g}s)")
            elif silent > self.cfg.heartbeat_timeout and not w.stopping:
                self._kill(w, f"missed heartbeats for {silent:.1f}s (hung?)")
            elif (w.state is State.LOADING and not w.spare
                  and now - w.last_used > self.cfg.load_timeout):
                self._kill(w, f"did not load within load_timeout ({self.cfg.load_timeout:g}s)")
            elif w.state is State.READY and w.inflight == 0:
                slot = self.slots.get(w.model_id)
                if slot and not slot.waiters and not slot.pinned and slot.entry.ttl > 0 \
                        and now - w.last_used >= slot.entry.ttl:
                    self._emit("ttl", model=w.model_id, pid=w.pid)
                    self._drain(w, f"idle for {slot.entry.ttl:g}s (ttl)")
        if now - self._last_ping >= self.cfg.heartbeat_interval:
            self._last_ping = now
            for w in self.workers.values():
                if w.pid is not None:
                    self.transport.send(w.worker_id, p.Ping())
        for slot in self.slots.values():
            if slot.pending_admission and slot.respawn_at <= now:
                slot.respawn_at = 0.0
                slot.pending_admission = False
                self._admit(slot)
            elif slot.pinned and slot.worker is None and not self.closing and not slot.pending_admission \
                    and slot.failed_until <= now:
                self._admit(slot)
            for w in list(slot.waiters):  # expire queue waiters whose client gave up
                if w.fut.done():
                    slot.waiters.remove(w)
        self._enforce_budget()
        self._ensure_spare()

    def _enforce_budget(self) -> None:
        """Apply ``eviction.relieve`` when measured growth puts the ledger over the budget."""
        over = self.used_bytes() - self.budget
        if over <= 0:
            return
        usages = [Usage(w.worker_id, w.bytes, w.estimate, -1.0 if w.spare else w.last_used,
                        idle=(w.state is State.READY and w.inflight == 0)
                        or (w.spare and w.state is State.LOADING),
                        pinned=bool(w.model_id in self.slots and self.slots[w.model_id].pinned),
                        stopping=w.stopping or w.state is State.DRAINING,
                        ready=w.state is State.READY, recycling=w.recycle)
                  for w in self.workers.values()]
        evict, recycle = relieve(usages, self.budget)
        for wid in evict:
            w = self.workers[wid]
            log.warning("memory over budget by %s: evicting %s", format_size(over), w.model_id)
            self._emit("evicted", model=w.model_id, pid=w.pid, reason="over budget")
            self._drain(w, f"evicted: memory over budget by {format_size(over)}")
        if recycle is not None:
            w = self.workers[recycle]
            w.recycle = True
            log.warning("model=%s pid=%s grew to %s (estimate %s) and the ledger is over budget: "
                        "recycling it when its requests finish", w.model_id, w.pid,
                        format_size(w.bytes), format_size(w.estimate))
            if w.inflight == 0:
                self._drain(w, "recycled: grew past its memory share")

    # ------------------------------------------------------------ warm spare

    def _adopt_spare(self, slot: Slot) -> bool:
        """Hand the model to the warm spare (imports already done) instead of a fresh process."""
        w, e = self.spare, slot.entry
        if (w is None or w.state is not State.LOADING or w.stopping or e.env or e.ranks > 1
                or e.kind not in SPARE_KINDS):
            return False
        self.spare = None
        w.model_id, w.kind, w.estimate, w.spare = e.id, e.kind, e.estimate, False
        w.context_length, w.reserved, w.memory = e.context_length, e.reserved, None
        w.last_used = time.monotonic()
        slot.worker = w
        slot.loads += 1
        self._emit("spawning", model=e.id, spare=True)
        log.info("model=%s pid=%s loading in the warm spare %s", e.id, w.pid, w.worker_id)
        self.transport.send(w.worker_id, p.Load(model_id=e.id, path=e.path, kind=e.kind,
                                                context_length=e.context_length))
        return True

    def _ensure_spare(self) -> None:
        """Keep one warm spare when it fits without evicting anything."""
        now = time.monotonic()
        if (not self.cfg.warm_spare or self.closing or self.spare is not None
                or now < self._spare_retry_at or any(s.pending_admission for s in self.slots.values())):
            return
        plan = plan_admission(WORKER_BASELINE, self._holders(SPARE), self.budget, self.max_models)
        if not plan.fits or plan.victims or plan.wait:
            return
        w = Worker(model_id=SPARE, worker_id=f"spare#{next(self._ids)}", estimate=WORKER_BASELINE,
                   kind="lm", spare=True)
        self.spare = w
        self.workers[w.worker_id] = w
        self.transport.allow(w.worker_id)
        self._spawn_task(self._spawn_process(w, None))
