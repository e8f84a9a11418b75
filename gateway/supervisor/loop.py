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
import time
from collections.abc import Callable
from typing import Any

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import group, process, views
from mlx_supervisor.gateway.supervisor.admin import AdminCommands
from mlx_supervisor.gateway.supervisor.eviction import Holder, plan_admission
from mlx_supervisor.gateway.supervisor.model import (
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
from mlx_supervisor.gateway.supervisor.states import State, transition
from mlx_supervisor.gateway.supervisor.transport import Transport
from mlx_supervisor.gateway.supervisor.upkeep import SPARE, Upkeep
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")
TICK = 0.2

Hook = Callable[[str, dict[str, Any]], None]


class Supervisor(AdminCommands, Upkeep):
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
        if self.closing or self._task is None or self._task.done():
            raise APIError(503, "server is shutting down", code="shutting_down", retry_after=5)
        waiter = Waiter(asyncio.get_running_loop().create_future(), request_id)
        self.events.put_nowait(Acquire(model_id, waiter))
        try:
            lease: Lease = await asyncio.wait_for(asyncio.shield(waiter.fut), self.cfg.queue_timeout)
        except asyncio.TimeoutError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise APIError(503, f"model {model_id!r} did not become available within "
                           f"queue_timeout ({self.cfg.queue_timeout:g}s)", code="queue_timeout",
                           retry_after=5) from None
        except asyncio.CancelledError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise
        task = asyncio.current_task()
        if task is not None and getattr(task, "cancelling", lambda: 0)():
            # Cancelled as the grant landed (wait_for returned the result): hand it back.
            self.events.put_nowait(Abandon(model_id, waiter))
            raise asyncio.CancelledError
        return lease

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
        if self.closing:
            self._fail_waiters(slot, APIError(503, "server is shutting down", code="shutting_down"))
            slot.pending_admission = False
            return
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
            transition(w, State.CRASHED, ev.error or "spawn failed")
            self._forget(w)
            slot = self.slots.get(w.model_id)
            if slot is not None and slot.worker is w:
                slot.worker = None
                self._record_crash(slot, ev.error or "spawn failed")
                self._fail_waiters(slot, APIError(503, ev.error or "spawn failed", code="model_failed"))
            self._retry_admissions()
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

    # ------------------------------------------------------------ views (read-only)

    def snapshot(self) -> dict[str, Any]:
        return views.snapshot(self)

    def model_info(self, model_id: str) -> dict[str, Any]:
        return views.model_info(self, model_id)
