"""The supervisor's data: one ``Worker`` per spawned process, one ``Slot`` per catalog model,
and the events its loop consumes. Plain data only; the behaviour lives in supervisor.py."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.supervisor.states import HOT, State
from mlx_supervisor.shared import protocol as p

if TYPE_CHECKING:
    from mlx_supervisor.gateway.supervisor.process import WorkerProcess


@dataclass(eq=False)
class Worker:
    model_id: str
    worker_id: str
    estimate: int
    kind: str
    state: State = State.STARTING
    pid: int | None = None
    proc: WorkerProcess | None = None
    started_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    memory: p.Memory | None = None
    inflight: int = 0
    worker_inflight: int = 0  # what the worker itself last reported running
    context_length: int = 0
    load_seconds: float = 0.0
    kill_reason: str | None = None
    stop_reason: str | None = None
    stopping: bool = False
    spare: bool = False
    reserved: bool = False
    recycle: bool = False  # grew past its share while the ledger was over budget
    ranks: list[p.RankInfo] = field(default_factory=list)  # a sharded group's ranks

    @property
    def bytes(self) -> int:
        """What the ledger charges: the measured footprint once known, else the estimate; an
        explicit ``memory`` in config is a reservation and is charged at least."""
        if self.memory is None:
            return self.estimate
        m = self.memory.footprint
        if self.state in (State.STARTING, State.LOADING) or self.reserved:
            return max(m, self.estimate)  # a partial load must not free room it will need
        return m

    @property
    def hot(self) -> bool:
        return self.state in HOT


@dataclass(eq=False)
class Waiter:
    fut: asyncio.Future[Any]
    request_id: str
    since: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Slot:
    entry: Entry
    pinned: bool = False
    worker: Worker | None = None
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)
    load_waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    failed_until: float = 0.0
    respawn_at: float = 0.0
    last_error: str | None = None
    pending_admission: bool = False
    last_used: float | None = None
    loads: int = 0


@dataclass(eq=False)
class Lease:
    """The right to send one request to one worker; ``release()`` hands it back (idempotent)."""

    model_id: str
    worker_id: str
    request_id: str
    pid: int | None
    kind: str
    context_length: int
    _release: Any = None
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


# ---------------------------------------------------------------- events


@dataclass
class Acquire:
    model_id: str
    waiter: Waiter


@dataclass
class Abandon:
    model_id: str
    waiter: Waiter


@dataclass
class Release:
    lease: Lease


@dataclass
class Spawned:
    worker: Worker
    proc: WorkerProcess | None
    error: str | None = None


@dataclass
class Control:
    worker_id: str
    msg: p.FromWorker


@dataclass
class Exited:
    worker: Worker
    returncode: int


@dataclass
class Tick:
    pass


@dataclass
class LoadCmd:
    model_id: str
    pin: bool | None
    fut: asyncio.Future[Any]


@dataclass
class UnloadCmd:
    model_id: str
    fut: asyncio.Future[Any]


@dataclass
class ShutdownCmd:
    grace: float
    fut: asyncio.Future[Any]


@dataclass
class CancelCmd:
    request_id: str
    reason: str
    fut: asyncio.Future[Any]


@dataclass
class ReloadCmd:
    entries: dict[str, Entry]
    aliases: dict[str, str]
    budget: int
    max_models: int
    fut: asyncio.Future[Any]


Event = (
    Acquire | Abandon | Release | Spawned | Control | Exited | Tick | LoadCmd | UnloadCmd
    | ShutdownCmd | CancelCmd | ReloadCmd
)
