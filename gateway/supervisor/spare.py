"""How a worker process is obtained, and the warm spare.

``Launcher`` is the one seam for obtaining a process: ``ExecLauncher`` execs
``python -m mlx_supervisor.worker`` (or an ``mlx.launch`` group for a sharded model); another
launcher (a fork server) can stand in without the handlers knowing.

The warm spare is a worker with its imports done and no model (state IDLE). A load adopts it
(``adopt``: one ``Load`` message instead of a new process) and a new spare starts in the
background when it fits without evicting anything (``wanted``). It is charged in the ledger and
is the first thing evicted.
"""

from __future__ import annotations

import logging
from typing import Protocol

from mlx_supervisor.gateway.catalog import WORKER_BASELINE, Entry
from mlx_supervisor.gateway.supervisor import events as ev
from mlx_supervisor.gateway.supervisor import group, process
from mlx_supervisor.gateway.supervisor.core import Core, move
from mlx_supervisor.gateway.supervisor.eviction import Holder, plan_admission
from mlx_supervisor.gateway.supervisor.model import Slot, Worker
from mlx_supervisor.gateway.supervisor.states import LEAVING, State
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config

log = logging.getLogger("mlx_supervisor.supervisor")
SPARE = "(spare)"  # model id of the warm spare: imports done, no model yet
SPARE_KINDS = frozenset({"lm", "vlm", "embeddings"})


class Launcher(Protocol):
    async def launch(self, worker: Worker, entry: Entry | None) -> process.WorkerProcess:
        """A running process for ``worker`` (``entry`` None: a spare); raises if none can start."""

    def start(self) -> None:
        """With the supervisor: start helper processes (the zygote)."""

    async def close(self) -> None:
        """After every worker has been reaped: stop them."""

    def held_bytes(self) -> int:
        """Bytes the launcher's own processes hold, charged in the ledger."""

    def info(self) -> dict[str, object] | None:
        """For ``/admin/ps``; None when there is nothing to show."""


class ExecLauncher:
    """A fresh interpreter per worker (``process.spawn``), or an ``mlx.launch`` group."""

    def __init__(self, cfg: Config, endpoint: str):
        self.cfg = cfg
        self.endpoint = endpoint

    async def launch(self, worker: Worker, entry: Entry | None) -> process.WorkerProcess:
        cfg, e = self.cfg, entry
        common = dict(endpoint=self.endpoint, worker_id=worker.worker_id,
                      heartbeat_interval=cfg.heartbeat_interval,
                      gateway_timeout=max(30.0, cfg.heartbeat_timeout * 3))
        if e is None:
            argv = process.worker_argv(model_id=SPARE, kind="lm", path=None, spare=True, **common)
            return await process.spawn(argv, process.worker_env({}, cfg.allow_download), SPARE)
        argv = process.worker_argv(model_id=e.id, kind=e.kind, path=e.path or None,
                                   context_length=e.context_length, **common)
        env = process.worker_env(e.env, cfg.allow_download)
        if e.ranks > 1:  # a sharded model: its mlx.launch group
            return await group.spawn_group(e, argv, env, self.endpoint)
        return await process.spawn(argv, env, e.id)

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def held_bytes(self) -> int:
        return 0

    def info(self) -> dict[str, object] | None:
        return None


def can_adopt(w: Worker | None, e: Entry) -> bool:
    return (w is not None and w.state is State.IDLE and not e.env and e.ranks <= 1
            and e.kind in SPARE_KINDS)


def adopt(core: Core, slot: Slot) -> bool:
    """Hand the model to the warm spare (imports already done) instead of a fresh process."""
    e = slot.entry
    w = next((s for s in core.spares if can_adopt(s, e)), None)
    if w is None:
        return False
    core.spares.remove(w)
    w.model_id, w.kind, w.estimate, w.spare = e.id, e.kind, slot.need, False
    w.context_length, w.reserved, w.memory = e.context_length, e.reserved, None
    w.load_started = w.last_used_mono = core.now()
    slot.worker = w
    slot.loads += 1
    move(core, w, State.LOADING, f"adopted for {e.id}")
    core.fx.emit(ev.Spawning(model=e.id, spare=True))
    log.info("model=%s pid=%s loading in the warm spare %s", e.id, w.pid, w.worker_id)
    core.fx.send(w.worker_id, p.Load(model_id=e.id, path=e.path, kind=e.kind,
                                     context_length=e.context_length))
    return True


def wanted(core: Core, holders: list[Holder], now: float) -> bool:
    """The pool is short of ``warm_spares`` and a new spare fits now without evicting or
    waiting for anything."""
    pool = core.cfg.warm_spares if core.cfg.warm_spare else 0
    if (core.closing or len(core.spares) >= pool
            or now < core.spare_retry_at or any(s.pending for s in core.slots.values())):
        return False
    if any(not w.spare and w.state in (State.STARTING, State.LOADING)
           for w in core.workers.values()):
        return False  # a load is under way: a new spare's start would take CPU from it
    plan = plan_admission(WORKER_BASELINE, holders, core.budget, core.max_models)
    return plan.fits and not plan.victims and not plan.wait


def start(core: Core) -> None:
    w = core.new_worker(SPARE, "spare", None, WORKER_BASELINE, "lm", spare=True)
    core.spares.append(w)
    core.fx.spawn(w, None)


def victim(core: Core) -> Worker | None:
    """The spare an eviction plan's ``SPARE`` stands for: one not already on its way out."""
    return next((s for s in core.spares if s.state not in LEAVING), None)


def lost(core: Core, w: Worker, retry_in: float) -> None:
    """The spare is gone (failed to start, or exited unasked): another in ``retry_in`` s."""
    if w in core.spares:
        core.spares.remove(w)
    if retry_in:
        core.spare_retry_at = core.now() + retry_in
