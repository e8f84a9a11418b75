"""Handlers for a worker's life: ``Spawned`` (the process exists, or could not start),
``Control`` (hello, ready, load failed, heartbeats) and ``Exited`` (the reap: stopped when we
asked, crashed otherwise; bytes leave the ledger here and nowhere else)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import admin, admission, process, recycle, spare
from mlx_supervisor.gateway.supervisor import core as c
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor.model import Control, Exited, Slot, Spawned, Worker
from mlx_supervisor.gateway.supervisor.states import State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.sizes import format_size

log = logging.getLogger("mlx_supervisor.supervisor")


def on_spawned(core: c.Core, e: Spawned) -> None:
    w = e.worker
    if e.proc is None:
        return _spawn_failed(core, w, e.error or "spawn failed")
    w.proc = e.proc
    w.pid = e.proc.pid
    w.last_heartbeat = core.now()
    log.info("model=%s pid=%d spawned as %s", w.model_id, w.pid, w.worker_id)
    if w.state is State.STOPPING:  # stopped while spawning (unload, shutdown)
        core.fx.stop(w)
    elif w.state is State.KILLING:
        core.fx.kill(w)


def _spawn_failed(core: c.Core, w: Worker, error: str) -> None:
    c.move(core, w, State.CRASHED, error)
    _forget(core, w)
    if w.spare:
        log.error("warm spare could not start: %s", error)
        return spare.lost(core, w, 60)
    slot = core.slots.get(w.model_id)
    if slot is not None and slot.worker is w:
        slot.worker = None
        c.record_crash(core, slot, error)
        c.fail_waiters(slot, APIError(503, error, code="model_failed"))
    admission.retry(core)
    admin.check_shutdown(core)


def on_control(core: c.Core, e: Control) -> None:
    w = core.workers.get(e.worker_id)
    if w is None:
        return
    msg = e.msg
    w.last_heartbeat = core.now()
    if isinstance(msg, p.Heartbeat):
        w.memory = msg.memory
        w.ranks = msg.ranks or w.ranks
        w.worker_inflight = msg.inflight + msg.queued
        _learn(core, w)
    elif isinstance(msg, p.Hello):
        w.pid = w.pid or msg.pid
        if w.state is State.STARTING:
            c.move(core, w, State.IDLE if w.spare else State.LOADING, "connected")
    elif isinstance(msg, p.Ready):
        _on_ready(core, w, msg)
    elif isinstance(msg, p.Unloaded):
        recycle.on_unloaded(core, w, msg)
        admission.retry(core)  # the admission waiting for it adopts it now
    elif isinstance(msg, p.LoadFailed):
        slot = core.slots.get(w.model_id)
        if slot is not None:
            slot.last_error, slot.last_detail = public_reason(msg.reason), msg.reason
        w.kill_reason = f"load failed: {msg.reason}"
        log.error("model=%s pid=%s load failed: %s", w.model_id, w.pid, msg.reason)


def _on_ready(core: c.Core, w: Worker, msg: p.Ready) -> None:
    if w.state not in (State.STARTING, State.LOADING):
        return
    w.memory = msg.memory
    w.ranks = msg.ranks
    w.kind = msg.kind or w.kind
    w.context_length = msg.context_length or w.context_length
    w.load_seconds = msg.load_seconds
    c.move(core, w, State.READY, f"loaded in {msg.load_seconds:.2f}s, {format_size(msg.memory.footprint)}")
    core.fx.emit(ev.WorkerReady(model=w.model_id, pid=w.pid, load_seconds=msg.load_seconds,
                                bytes=w.bytes))
    slot = core.slots.get(w.model_id)
    if slot is None:
        return
    slot.last_error = None
    w.ready_mono = core.now()
    _learn(core, w)
    for f in slot.load_waiters:
        if not f.done():
            f.set_result(w)
    slot.load_waiters.clear()
    c.pump(core, slot)


_PATH = re.compile(r"(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'\"():,;]+){2,}[/\\]?")


def public_reason(text: str) -> str:
    """What an API client may see of why a worker failed: the cause, with file-system paths cut
    to their last part and no stderr tail (that stays in the logs and /admin/*)."""
    text = text.split("; last stderr:", 1)[0]
    text = _PATH.sub(lambda m: m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)
    text = re.sub(r"loading \S+ from \S+ failed: ", "", text)
    return text[:300]


# ``SomeError: message`` from Python, or the sharded launcher's own verdict on its group.
_EXC = re.compile(r"(?:^|\s)([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt): .+"
                  r"|sharded group failed: .+)$")


def _exception_line(tail: Iterable[str]) -> str | None:
    """The last ``SomeError: message`` (or launcher verdict) in a dead worker's stderr: usually
    why it died."""
    for line in reversed(list(tail)):
        m = _EXC.search(line.strip())
        if m:
            return m.group(1)
    return None


def _learn(core: c.Core, w: Worker) -> None:
    """A serving worker's measured footprint (plus growth headroom) becomes what its model's
    next admission needs, in place of the estimate from its weight files."""
    slot = core.slots.get(w.model_id)
    if (slot is not None and slot.worker is w and w.memory is not None
            and w.state in (State.READY, State.DRAINING)):
        slot.learn(w.memory.footprint, core.cfg.learned_headroom)


def on_exited(core: c.Core, e: Exited) -> None:
    w = e.worker
    how = process.describe_exit(e.returncode)
    asked = w.state in (State.DRAINING, State.STOPPING) and w.kill_reason is None
    was = w.killed_in if w.state is State.KILLING else w.state
    was_loading = was in (State.STARTING, State.LOADING)
    # Clients get the concise cause; the stderr tail (tracebacks, paths, other requests' ids)
    # goes only to the logs, the bus (status page) and /admin/ps.
    reason = public_reason(w.kill_reason or how)
    detail = w.kill_reason or how
    if w.proc and e.returncode != 0 and not asked and w.proc.stderr_tail:
        detail += "; last stderr: " + " | ".join(list(w.proc.stderr_tail)[-5:])
        cause = _exception_line(w.proc.stderr_tail)
        if cause and not w.kill_reason:
            reason += ": " + public_reason(cause)
    c.move(core, w, State.STOPPED if asked else State.CRASHED,
           f"{w.stop_reason or 'stopped'}; {how}" if asked else detail)
    n = core.fx.fail_streams(w.worker_id, f"worker for model {w.model_id!r} {reason}")
    if n:
        log.warning("model=%s pid=%s failed %d request(s) in flight", w.model_id, w.pid, n)
    _forget(core, w)
    for f in w.exit_waiters:
        if not f.done():
            f.set_result(None)
    if w.spare:
        spare.lost(core, w, 0 if asked else 30)
    else:
        core.fx.emit((ev.WorkerStopped if asked else ev.WorkerCrashed)(
            model=w.model_id, pid=w.pid, reason=detail, returncode=e.returncode))
        slot = core.slots.get(w.model_id)
        if slot is not None and slot.worker is w:
            if w.ready_mono is not None:  # its turn at the memory is over
                slot.served_seconds += core.now() - w.ready_mono
            _after_exit(core, slot, w, reason, asked, was_loading)
            if not asked:
                slot.last_detail = detail
    admission.retry(core)
    admin.check_shutdown(core)


def _after_exit(core: c.Core, slot: Slot, w: Worker, reason: str, asked: bool,
                was_loading: bool) -> None:
    """The slot's worker is gone: back off, tell the waiters, or admit it again."""
    slot.worker = None
    if not asked:
        c.record_crash(core, slot, reason)
    if was_loading and not asked:
        # A failed load is deterministic more often than not: tell the waiters now.
        c.fail_waiters(slot, APIError(
            503, f"model {w.model_id!r} failed to load: {reason.removeprefix('load failed: ')}",
            code="model_failed",
            retry_after=max(1.0, slot.failed_until - core.now())))
    elif not core.closing and (slot.waiters or slot.load_waiters or slot.pinned):
        err = c.failed_error(core, slot)
        if err:
            c.fail_waiters(slot, err)
        else:
            admission.admit(core, slot)
    else:
        c.fail_waiters(slot, APIError(503, f"model {w.model_id!r} {reason}", code="model_failed"))


def _forget(core: c.Core, w: Worker) -> None:
    core.workers.pop(w.worker_id, None)
    core.fx.forget(w.worker_id)
