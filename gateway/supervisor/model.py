"""The supervisor's data: one ``Worker`` per spawned process, one ``Slot`` per catalog model,
and the events its loop consumes. Plain data only; the behaviour lives in the handler modules
(see SUPERVISOR.md)."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.supervisor.states import HOT, SlotState, State
from mlx_supervisor.shared import protocol as p


class Proc(Protocol):
    """What the handlers read of a worker's process (``process.WorkerProcess``, or a test's fake)."""

    @property
    def pid(self) -> int: ...
    @property
    def exited(self) -> bool: ...
    stderr_tail: collections.deque[str]


@dataclass(eq=False)
class Worker:
    model_id: str
    worker_id: str
    estimate: int
    kind: str
    state: State = State.STARTING
    pid: int | None = None
    proc: Proc | None = None
    started_at: float = field(default_factory=time.time)  # wall clock, for display
    load_started: float = field(default_factory=time.monotonic)  # spawn or adoption; load_timeout
    last_used_mono: float = field(default_factory=time.monotonic)  # last grant or release; LRU, ttl
    ready_mono: float | None = None  # when it became ready: how long its turn has run
    last_heartbeat: float = field(default_factory=time.monotonic)
    memory: p.Memory | None = None
    inflight: int = 0
    parked: int = 0  # of those, requests parked (paused, their client behind): no slot held
    behind: set[Lease] = field(default_factory=set)  # leases whose client's writes are paused
    worker_inflight: int = 0  # what the worker itself last reported running
    context_length: int = 0
    load_seconds: float = 0.0
    kill_reason: str | None = None  # set: its exit is a crash with this reason (killed, load failed)
    stop_reason: str | None = None
    killed_in: State | None = None  # the state it was killed in (a killed loader failed to load)
    spare: bool = False  # the warm spare (no model yet); False once adopted
    reserved: bool = False
    recycle: bool = False  # grew past its share while the ledger was over budget
    recycles: int = 0  # models this process has unloaded to take another (recycle.py)
    idle_floor: int = 0  # its footprint after its first unload: later ones must stay near it
    ranks: list[p.RankInfo] = field(default_factory=list)  # a sharded group's ranks
    exit_waiters: list[asyncio.Future[Any]] = field(default_factory=list)  # unload: resolved on reap

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
    state: SlotState = SlotState.COLD
    failed_until: float = 0.0  # monotonic; FAILED until then
    respawn_at: float = 0.0  # monotonic; BACKING_OFF until then
    last_error: str | None = None  # the concise cause, for API clients
    last_detail: str | None = None  # with the worker's stderr tail, for /admin/* and the logs
    last_used_wall: float | None = None  # wall clock of the last grant or release, for display
    loads: int = 0
    served_seconds: float = 0.0  # seconds its past workers held memory once ready (turn order)
    eta: float = 0.0  # monotonic: when a WAITING model expects its memory (Retry-After)
    learned: int = 0
    """Measured footprint × (1 + learned_headroom), the most seen while serving, at most the
    estimate (learning only lets more fit; growth past the estimate is ``relieve``'s); 0: not
    yet."""

    @property
    def model_id(self) -> str:
        return self.entry.id

    @property
    def need(self) -> int:
        """Bytes its next admission must find: the learned figure once the model has loaded,
        else the estimate from its weight files; a ``memory`` reservation always wins."""
        return self.learned if self.learned and not self.entry.reserved else self.entry.estimate

    def learn(self, footprint: int, headroom: float) -> None:
        if headroom > 0 and footprint > 0:
            grown = max(self.learned, int(footprint * (1 + headroom)))
            self.learned = min(grown, self.entry.estimate)

    @property
    def pending(self) -> bool:
        """An admission waits (for reaps, or for the crash backoff)."""
        return self.state in (SlotState.PENDING, SlotState.BACKING_OFF)


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
    parked: bool = False  # paused in its worker, its concurrency slot lent out (flow.py)
    backlog: bool = False  # its stream fell stream_buffer messages behind (and paused it)
    behind: bool = False  # its client's connection refused more bytes (writes paused)

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
class Park:
    """A request's stream fell ``stream_buffer`` messages behind (and paused it), or caught up."""

    lease: Lease
    parked: bool


@dataclass
class Behind:
    """A request's client connection stopped taking bytes (the kernel refused more), or drained."""

    lease: Lease
    behind: bool


@dataclass
class Spawned:
    worker: Worker
    proc: Proc | None
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
    """Every ``loop.TICK`` seconds: the timers (timers.due) run."""


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
    Acquire | Abandon | Release | Park | Behind | Spawned | Control | Exited | Tick | LoadCmd | UnloadCmd
    | ShutdownCmd | CancelCmd | ReloadCmd
)
