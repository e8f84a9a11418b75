"""The supervisor: one asyncio task that owns every worker's state (see SUPERVISOR.md).

Routes never touch worker state: they ``await acquire()`` and get a ``Lease`` or an
``APIError``. Everything else (process exits, worker messages, timers, admin commands) arrives
as an event on one queue and is handled by one small ``on_<event>`` method. Slow work (spawning,
stopping) runs in its own task and comes back as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec

from mlx_supervisor.gateway import group, process
from mlx_supervisor.gateway.catalog import WORKER_BASELINE, Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.eviction import Holder, plan_admission
from mlx_supervisor.gateway.states import HOT, State, transition
from mlx_supervisor.gateway.transport import Transport
from mlx_supervisor.gateway.workers import (
    Abandon,
    Acquire,
    CancelCmd,
    Control,
    Event,
    Exited,
    Lease,
    LoadCmd,
    Release,
    ReloadCmd,
    ShutdownCmd,
    Slot,
    Spawned,
    Tick,
    UnloadCmd,
    Waiter,
    Worker,
)
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")
TICK = 0.2
SPARE = "(spare)"  # model id of the warm spare: imports done, no model yet
SPARE_KINDS = frozenset({"lm", "vlm", "embeddings"})

Hook = Callable[[str, dict[str, Any]], None]


class Supervisor:
    def __init__(self, cfg: Config, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
                 endpoint: str):
        self.cfg = cfg
        self.budget = budget
        self.max_models = cfg.max_models
        self.aliases = aliases
        self.slots: dict[str, Slot] = {m: Slot(entry=e, pinned=e.pinned) for m, e in entries.items()}
        self.workers: dict[str, Worker] = {}  # worker_id -> worker, until reaped
        self.transport = Transport(endpoint, self._on_transport_control)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.closing = False
        self.started = time.time()
        self.hooks: list[Hook] = []  # observers (metrics, status page, ledger)
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._last_ping = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.spare: Worker | None = None
        self._spare_retry_at = 0.0

    # ------------------------------------------------------------ public API (any task)

    async def start(self) -> None:
        self.transport.start()
        self._task = asyncio.create_task(self._run(), name="supervisor")
        self._ticker = asyncio.create_task(self._tick_loop(), name="supervisor-tick")
        for slot in self.slots.values():
            if slot.pinned:
                self._post_load(slot.entry.id)

    def resolve(self, name: str) -> str | None:
        if name in self.slots:
            return name
        return self.aliases.get(name)

    async def acquire(self, model_id: str, request_id: str) -> Lease:
        """Wait for a worker of ``model_id`` with a free concurrency slot; bounded by queue_timeout."""
        waiter = Waiter(asyncio.get_running_loop().create_future(), request_id)
        self.events.put_nowait(Acquire(model_id, waiter))
        try:
            lease: Lease = await asyncio.wait_for(asyncio.shield(waiter.fut), self.cfg.queue_timeout)
            return lease
        except asyncio.TimeoutError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise APIError(503, f"model {model_id!r} did not become available within "
                           f"queue_timeout ({self.cfg.queue_timeout:g}s)", code="queue_timeout",
                           retry_after=5) from None
        except asyncio.CancelledError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise

    async def load(self, model_id: str, pin: bool | None = None) -> Worker:
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(LoadCmd(model_id, pin, fut))
        return await fut

    async def unload(self, model_id: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(UnloadCmd(model_id, fut))
        await fut

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(CancelCmd(request_id, reason, fut))
        return bool(await fut)

    async def reload(self, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
                     max_models: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(ReloadCmd(entries, aliases, budget, max_models, fut))
        await fut

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain in-flight requests up to ``grace``, then stop every worker and wait for the reaps."""
        if self._task is None or self._task.done():
            return
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(ShutdownCmd(self.cfg.shutdown_grace if grace is None else grace, fut))
        with contextlib.suppress(asyncio.CancelledError):
            await fut
        for t in (self._ticker, self._task):
            if t:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await self.transport.close()

    def used_bytes(self) -> int:
        """The ledger: bytes of every process not yet reaped (measured, else estimated)."""
        return sum(w.bytes for w in self.workers.values())

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            ev = await self.events.get()
            handler = getattr(self, "on_" + type(ev).__name__.lower())
            try:
                handler(ev)
            except Exception:
                log.exception("supervisor handler %s failed", type(ev).__name__)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.events.put_nowait(Tick())

    def _on_transport_control(self, worker_id: str, msg: p.FromWorker) -> None:
        self.events.put_nowait(Control(worker_id, msg))

    def _emit(self, kind: str, **data: Any) -> None:
        for hook in list(self.hooks):
            try:
                hook(kind, data)
            except Exception:
                log.exception("supervisor hook failed")

    def _spawn_task(self, coro: Any) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ requests

    def on_acquire(self, ev: Acquire) -> None:
        slot = self.slots.get(ev.model_id)
        w = ev.waiter
        if w.fut.done():
            return
        if slot is None:
            w.fut.set_exception(APIError(404, f"model {ev.model_id!r} does not exist", code="model_not_found"))
            return
        if self.closing:
            w.fut.set_exception(APIError(503, "server is shutting down", code="shutting_down", retry_after=5))
            return
        err = self._failed_error(slot)
        if err:
            w.fut.set_exception(err)
            return
        worker = slot.worker
        if (worker and worker.state is State.READY and not slot.waiters
                and worker.inflight < slot.entry.max_concurrency):
            self._grant(slot, worker, w)
            return
        if len(slot.waiters) >= slot.entry.max_queue:
            w.fut.set_exception(APIError(
                429, f"model {ev.model_id!r} is at capacity: {slot.entry.max_concurrency} in flight "
                f"and {len(slot.waiters)} queued (max_queue)", code="queue_full", retry_after=1))
            return
        slot.waiters.append(w)
        self._emit("queued", model=slot.entry.id, request_id=w.request_id)
        if worker is None or worker.state is State.DRAINING:
            self._admit(slot)

    def on_abandon(self, ev: Abandon) -> None:
        slot = self.slots.get(ev.model_id)
        if slot and ev.waiter in slot.waiters:
            slot.waiters.remove(ev.waiter)
        fut = ev.waiter.fut
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()
        elif not fut.done():
            fut.cancel()

    def on_release(self, ev: Release) -> None:
        worker = self.workers.get(ev.lease.worker_id)
        if worker is None:
            return
        worker.inflight -= 1
        worker.last_used = time.monotonic()
        slot = self.slots.get(worker.model_id)
        if slot is not None:
            slot.last_used = time.time()
            if worker.state is State.READY:
                self._pump(slot)
        if worker.state is State.READY and worker.recycle and worker.inflight == 0:
            self._drain(worker, "recycled: grew past its memory share")
        if worker.state is State.DRAINING and worker.inflight == 0:
            self._stop(worker, worker.stop_reason or "drained")

    def _grant(self, slot: Slot, worker: Worker, w: Waiter) -> None:
        worker.inflight += 1
        worker.last_used = time.monotonic()
        slot.last_used = time.time()
        lease = Lease(slot.entry.id, worker.worker_id, w.request_id, worker.pid, worker.kind,
                      worker.context_length, _release=self._release_lease)
        w.fut.set_result(lease)
        self._emit("granted", model=slot.entry.id, request_id=w.request_id, pid=worker.pid,
                   waited=time.monotonic() - w.since)

    def _release_lease(self, lease: Lease) -> None:
        self.events.put_nowait(Release(lease))

    def _pump(self, slot: Slot) -> None:
        worker = slot.worker
        while (worker and worker.state is State.READY and slot.waiters
               and worker.inflight < slot.entry.max_concurrency):
            w = slot.waiters.popleft()
            if not w.fut.done():
                self._grant(slot, worker, w)

    def _fail_waiters(self, slot: Slot, err: APIError) -> None:
        while slot.waiters:
            w = slot.waiters.popleft()
            if not w.fut.done():
                w.fut.set_exception(err)
        for f in slot.load_waiters:
            if not f.done():
                f.set_exception(err)
        slot.load_waiters.clear()

    def _failed_error(self, slot: Slot) -> APIError | None:
        left = slot.failed_until - time.monotonic()
        if left <= 0:
            return None
        return APIError(503, f"model {slot.entry.id!r} failed and is backing off for {left:.0f}s; "
                        f"last error: {slot.last_error}", code="model_failed", retry_after=left)

    # ------------------------------------------------------------ admission and eviction

    def _holders(self, exclude: str) -> list[Holder]:
        out = [
            Holder(w.model_id, w.bytes, -1.0 if w.spare else w.last_used,
                   pinned=self.slots[w.model_id].pinned if w.model_id in self.slots else False,
                   busy=not w.spare and (w.inflight > 0 or w.state in (State.STARTING, State.LOADING)
                   or bool(self.slots.get(w.model_id) and self.slots[w.model_id].waiters and not w.stopping)),
                   stopping=w.stopping or w.state is State.DRAINING)
            for w in self.workers.values()
        ]
        # Admissions already waiting for reaps hold a reservation nobody may take.
        out += [Holder(s.entry.id + "#reserved", s.entry.estimate, 0.0, busy=True)
                for s in self.slots.values() if s.pending_admission and s.entry.id != exclude]
        return out

    def _admit(self, slot: Slot) -> None:
        """Make room for ``slot``'s model and spawn it, or fail its waiters with the reason."""
        if slot.worker is not None and slot.worker.state is not State.DRAINING:
            return  # already starting or hot
        if slot.respawn_at > time.monotonic():
            slot.pending_admission = True
            return
        need = slot.entry.estimate
        if need > self.budget:
            self._fail_waiters(slot, APIError(
                503, f"model {slot.entry.id!r} needs {format_size(need)}, more than the whole memory "
                f"budget of {format_size(self.budget)}", code="insufficient_memory"))
            slot.pending_admission = False
            return
        holders = self._holders(slot.entry.id)
        plan = plan_admission(need, holders, self.budget, self.max_models)
        if not plan.fits:
            held = ", ".join(f"{h.model_id} {format_size(h.bytes)}"
                             + (" (pinned)" if h.pinned else " (busy)" if h.busy else "")
                             for h in holders) or "nothing"
            self._fail_waiters(slot, APIError(
                503, f"not enough memory for model {slot.entry.id!r}: needs {format_size(need)}, "
                f"budget {format_size(self.budget)}, {format_size(self.used_bytes())} in use by: {held}",
                code="insufficient_memory", retry_after=10))
            slot.pending_admission = False
            return
        for victim_id in plan.victims:
            victim = self.spare if victim_id == SPARE else self.slots[victim_id].worker
            if victim is not None:
                self._emit("evicted", model=victim_id, pid=victim.pid, reason=f"making room for {slot.entry.id}")
                self._drain(victim, f"evicted (LRU) to make room for {slot.entry.id}")
        if plan.wait or (slot.worker is not None):
            slot.pending_admission = True  # retried on every reap
            return
        slot.pending_admission = False
        self._spawn(slot)

    def _retry_admissions(self) -> None:
        for slot in self.slots.values():
            if slot.pending_admission:
                slot.pending_admission = False
                self._admit(slot)

    def _spawn(self, slot: Slot) -> None:
        e = slot.entry
        if self._adopt_spare(slot):
            return
        wid = f"{e.id}#{next(self._ids)}"
        worker = Worker(model_id=e.id, worker_id=wid, estimate=e.estimate, kind=e.kind,
                        context_length=e.context_length, reserved=e.reserved)
        slot.worker = worker
        slot.loads += 1
        self.workers[wid] = worker
        self.transport.allow(wid)
        self._emit("spawning", model=e.id)
        log.info("model=%s spawning worker %s (estimate %s, ledger %s of %s)", e.id, wid,
                 format_size(e.estimate), format_size(self.used_bytes()), format_size(self.budget))
        self._spawn_task(self._spawn_process(worker, e))

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

    async def _spawn_process(self, worker: Worker, e: Entry | None) -> None:
        common = dict(endpoint=self.transport.endpoint, worker_id=worker.worker_id,
                      heartbeat_interval=self.cfg.heartbeat_interval,
                      gateway_timeout=max(30.0, self.cfg.heartbeat_timeout * 3))
        if e is None:
            argv = process.worker_argv(model_id=SPARE, kind="lm", path=None, spare=True, **common)
            env = process.worker_env({}, self.cfg.allow_download)
        else:
            argv = process.worker_argv(model_id=e.id, kind=e.kind, path=e.path or None,
                                       context_length=e.context_length, **common)
            env = process.worker_env(e.env, self.cfg.allow_download)
        try:
            if e is not None and e.ranks > 1:  # a sharded model: its mlx.launch group
                wp: process.WorkerProcess = await group.spawn_group(e, argv, env,
                                                                    self.transport.endpoint)
            else:
                wp = await process.spawn(argv, env, e.id if e else SPARE)
        except Exception as exc:  # e.g. interpreter missing, fork failure
            self.events.put_nowait(Spawned(worker, None, f"could not start worker: {exc}"))
            return
        self.events.put_nowait(Spawned(worker, wp))
        rc = await wp.wait()
        self.events.put_nowait(Exited(worker, rc))

    def on_spawned(self, ev: Spawned) -> None:
        w = ev.worker
        if ev.proc is None and w.spare:
            log.error("warm spare could not start: %s", ev.error)
            self._spare_retry_at = time.monotonic() + 60
            self.spare = None
            transition(w, State.CRASHED, ev.error or "spawn failed")
            self._forget(w)
            return
        if ev.proc is None:
            slot = self.slots[w.model_id]
            self._record_crash(slot, ev.error or "spawn failed")
            transition(w, State.CRASHED, ev.error or "spawn failed")
            self._forget(w)
            self._fail_waiters(slot, APIError(503, ev.error or "spawn failed", code="model_failed"))
            return
        w.proc = ev.proc
        w.pid = ev.proc.pid
        w.last_heartbeat = time.monotonic()
        log.info("model=%s pid=%d spawned as %s", w.model_id, w.pid, w.worker_id)
        if w.stopping:  # stopped while spawning (unload, shutdown)
            self._spawn_task(self._stop_process(w))

    # ------------------------------------------------------------ worker messages

    def on_control(self, ev: Control) -> None:
        w = self.workers.get(ev.worker_id)
        if w is None:
            return
        msg = ev.msg
        w.last_heartbeat = time.monotonic()
        if isinstance(msg, p.Heartbeat):
            w.memory = msg.memory
            w.ranks = msg.ranks or w.ranks
            w.worker_inflight = msg.inflight + msg.queued
        elif isinstance(msg, p.Hello):
            w.pid = w.pid or msg.pid
            if w.state is State.STARTING:
                transition(w, State.LOADING, "connected")
        elif isinstance(msg, p.Ready):
            self._on_ready(w, msg)
        elif isinstance(msg, p.LoadFailed):
            slot = self.slots[w.model_id]
            slot.last_error = msg.reason
            w.kill_reason = f"load failed: {msg.reason}"
            log.error("model=%s pid=%s load failed: %s", w.model_id, w.pid, msg.reason)

    def _on_ready(self, w: Worker, msg: p.Ready) -> None:
        if w.state not in (State.STARTING, State.LOADING):
            return
        w.memory = msg.memory
        w.ranks = msg.ranks
        w.kind = msg.kind or w.kind
        w.context_length = msg.context_length or w.context_length
        w.load_seconds = msg.load_seconds
        w.ready_at = time.time()
        transition(w, State.READY, f"loaded in {msg.load_seconds:.2f}s, {format_size(msg.memory.footprint)}")
        slot = self.slots[w.model_id]
        slot.last_error = None
        self._emit("ready", model=w.model_id, pid=w.pid, load_seconds=msg.load_seconds,
                   bytes=w.bytes)
        for f in slot.load_waiters:
            if not f.done():
                f.set_result(w)
        slot.load_waiters.clear()
        self._pump(slot)

    def on_exited(self, ev: Exited) -> None:
        w = ev.worker
        how = process.describe_exit(ev.returncode)
        slot = self.slots.get(w.model_id)
        asked = w.state is State.DRAINING and w.kill_reason is None
        was_loading = w.state in (State.STARTING, State.LOADING)
        reason = w.kill_reason or how
        if w.proc and ev.returncode not in (0,) and not asked and w.proc.stderr_tail:
            reason += "; last stderr: " + " | ".join(list(w.proc.stderr_tail)[-5:])
        if asked:
            transition(w, State.STOPPED, f"{w.stop_reason or 'stopped'}; {how}")
        else:
            transition(w, State.CRASHED, reason)
        n = self.transport.fail_worker(w.worker_id, f"worker for model {w.model_id!r} {reason}")
        if n:
            log.warning("model=%s pid=%s failed %d request(s) in flight", w.model_id, w.pid, n)
        self._forget(w)
        if w.spare:
            if self.spare is w:
                self.spare = None
            if not asked:
                self._spare_retry_at = time.monotonic() + 30
            self._retry_admissions()
            return
        self._emit("stopped" if asked else "crashed", model=w.model_id, pid=w.pid, reason=reason,
                   returncode=ev.returncode)
        if slot is not None and slot.worker is w:
            slot.worker = None
            if not asked:
                self._record_crash(slot, reason)
            if was_loading and not asked:
                # A failed load is deterministic more often than not: tell the waiters now.
                self._fail_waiters(slot, APIError(
                    503, f"model {w.model_id!r} failed to load: {reason}", code="model_failed",
                    retry_after=max(1.0, slot.failed_until - time.monotonic())))
            elif not self.closing and (slot.waiters or slot.load_waiters or slot.pinned):
                err = self._failed_error(slot)
                if err:
                    self._fail_waiters(slot, err)
                else:
                    self._admit(slot)
            else:
                self._fail_waiters(slot, APIError(503, f"model {w.model_id!r} {reason}", code="model_failed"))
        self._retry_admissions()

    def _forget(self, w: Worker) -> None:
        self.workers.pop(w.worker_id, None)
        self.transport.forget(w.worker_id)

    def _record_crash(self, slot: Slot, reason: str) -> None:
        now = time.monotonic()
        slot.last_error = reason
        slot.crashes.append(now)
        while slot.crashes and now - slot.crashes[0] > self.cfg.crash_window:
            slot.crashes.popleft()
        n = len(slot.crashes)
        if n >= self.cfg.max_crashes:
            backoff = min(5.0 * 2 ** (n - self.cfg.max_crashes), 300.0)
            slot.failed_until = now + backoff
            log.error("model=%s failed %d times in %.0fs; backing off %.0fs: %s", slot.entry.id, n,
                      self.cfg.crash_window, backoff, reason)
        elif n >= 2:
            slot.respawn_at = now + min(0.5 * 2 ** (n - 2), 10.0)

    # ------------------------------------------------------------ stopping

    def _drain(self, w: Worker, reason: str) -> None:
        """No new requests; stop once the in-flight ones finish."""
        if w.state in (State.STARTING, State.LOADING, State.READY):
            transition(w, State.DRAINING, reason)
            w.stop_reason = reason
        if w.inflight == 0:
            self._stop(w, reason)

    def _stop(self, w: Worker, reason: str) -> None:
        if w.stopping:
            return
        w.stopping = True
        w.stop_reason = w.stop_reason or reason
        if w.proc is not None:
            self._spawn_task(self._stop_process(w))

    async def _stop_process(self, w: Worker) -> None:
        assert w.proc is not None
        await w.proc.stop(lambda: self.transport.send(w.worker_id, p.Shutdown(reason=w.stop_reason or "")),
                          self.cfg.stop_grace)

    def _kill(self, w: Worker, reason: str) -> None:
        """A worker we no longer trust (hung, failed load): SIGKILL now, crashed when reaped."""
        w.kill_reason = w.kill_reason or reason
        log.error("model=%s pid=%s killing: %s", w.model_id, w.pid, reason)
        if w.proc is not None:
            w.proc.signal_group(9)

    # ------------------------------------------------------------ timers

    def on_tick(self, ev: Tick) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.proc is None or w.proc.proc.returncode is not None:
                continue
            silent = now - w.last_heartbeat
            if w.kill_reason and w.state is not State.DRAINING:
                if silent > 1.0:  # a failed loader that did not exit by itself
                    self._kill(w, w.kill_reason)
            elif silent > self.cfg.heartbeat_timeout and not w.stopping:
                self._kill(w, f"missed heartbeats for {silent:.1f}s (hung?)")
            elif (w.state in (State.STARTING, State.LOADING) and not w.spare
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
        """Workers grow after admission (KV cache, buffers). Policy when the measured total goes
        over the budget: evict idle unpinned workers, least recently used first (the spare first);
        if that is not enough, recycle the worker that grew most past its estimate as soon as its
        in-flight requests finish (a pinned one is reloaded right after)."""
        over = self.used_bytes() - self.budget
        if over <= 0:
            return
        stopping = sum(w.bytes for w in self.workers.values() if w.stopping or w.state is State.DRAINING)
        over -= stopping
        idle = sorted((w for w in self.workers.values()
                       if w.state is State.READY and w.inflight == 0 and not w.stopping
                       and not (w.model_id in self.slots and self.slots[w.model_id].pinned)),
                      key=lambda w: -1.0 if w.spare else w.last_used)
        if self.spare is not None and self.spare.state is State.LOADING and not self.spare.stopping:
            idle.insert(0, self.spare)
        for w in idle:
            if over <= 0:
                return
            log.warning("memory over budget by %s: evicting %s", format_size(over), w.model_id)
            self._emit("evicted", model=w.model_id, pid=w.pid, reason="over budget")
            self._drain(w, f"evicted: memory over budget by {format_size(over)}")
            over -= w.bytes
        if over <= 0:
            return
        growers = [w for w in self.workers.values()
                   if w.state is State.READY and not w.recycle and w.bytes > w.estimate]
        if growers:
            w = max(growers, key=lambda w: w.bytes - w.estimate)
            w.recycle = True
            log.warning("model=%s pid=%s grew to %s (estimate %s) and the ledger is over budget: "
                        "recycling it when its requests finish", w.model_id, w.pid,
                        format_size(w.bytes), format_size(w.estimate))
            if w.inflight == 0:
                self._drain(w, "recycled: grew past its memory share")

    # ------------------------------------------------------------ admin commands

    def _post_load(self, model_id: str) -> None:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self.events.put_nowait(LoadCmd(model_id, None, fut))

    def on_loadcmd(self, ev: LoadCmd) -> None:
        slot = self.slots.get(ev.model_id)
        if slot is None:
            ev.fut.set_exception(APIError(404, f"model {ev.model_id!r} does not exist", code="model_not_found"))
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

    # ------------------------------------------------------------ views (read-only)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        workers = []
        for w in self.workers.values():
            slot = self.slots.get(w.model_id)
            ttl = slot.entry.ttl if slot else 0
            workers.append({
                "model": w.model_id, "spare": w.spare, "worker_id": w.worker_id, "pid": w.pid, "state": w.state.value,
                "kind": w.kind, "memory_bytes": w.memory.footprint if w.memory else 0,
                "estimated_bytes": w.estimate, "charged_bytes": w.bytes,
                "memory": {"active": w.memory.active, "cache": w.memory.cache, "peak": w.memory.peak,
                           "rss": w.memory.rss} if w.memory else None,
                "pinned": bool(slot and slot.pinned), "inflight": w.inflight,
                "worker_inflight": w.worker_inflight,
                "queued": len(slot.waiters) if slot else 0,
                "last_used": time.time() - (now - w.last_used),
                "idle_seconds": round(now - w.last_used, 3),
                "ttl": ttl,
                "ttl_remaining": (max(0.0, ttl - (now - w.last_used)) if ttl > 0 and not (slot and slot.pinned)
                                  and w.inflight == 0 else None),
                "started_at": w.started_at, "load_seconds": w.load_seconds,
                "ranks": [msgspec.structs.asdict(r) for r in w.ranks],
            })
        return {
            "pid": os.getpid(), "uptime": time.time() - self.started, "budget_bytes": self.budget,
            "used_bytes": self.used_bytes(), "max_models": self.max_models, "workers": workers,
        }

    def model_info(self, model_id: str) -> dict[str, Any]:
        slot = self.slots[model_id]
        w = slot.worker
        state = w.state.value if w else ("failed" if slot.failed_until > time.monotonic() else "cold")
        return {
            "state": state, "kind": slot.entry.kind, "pinned": slot.pinned,
            "memory": w.bytes if w else 0, "estimated_bytes": slot.entry.estimate,
            "aliases": slot.entry.aliases, "pid": w.pid if w else None,
            "last_error": slot.last_error, "loads": slot.loads,
            "context_length": (w.context_length if w else 0) or slot.entry.context_length,
        }
