"""The supervisor: one asyncio task that owns every worker's state (see SUPERVISOR.md).

Routes never touch worker state: they ``await acquire()`` and get a ``Lease`` or an
``APIError``. Everything else (process exits, worker messages, timers, admin commands) arrives
as an event on one queue and goes to its handler (``handlers.HANDLERS``), which changes the
``Core`` and asks ``Effects`` for anything outside it. Slow work (spawning, stopping) runs in its
own task and comes back as an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from mlx_supervisor.gateway.bus import Bus
from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.supervisor import views
from mlx_supervisor.gateway.supervisor.core import Core, shutting_down
from mlx_supervisor.gateway.supervisor.effects import ProcessEffects
from mlx_supervisor.gateway.supervisor.handlers import dispatch
from mlx_supervisor.gateway.supervisor.model import (
    Abandon,
    Acquire,
    Behind,
    CancelCmd,
    Control,
    Event,
    Lease,
    LoadCmd,
    Park,
    ReloadCmd,
    ShutdownCmd,
    Slot,
    Tick,
    UnloadCmd,
    Waiter,
    Worker,
)
from mlx_supervisor.gateway.supervisor.spare import ExecLauncher, Launcher
from mlx_supervisor.gateway.supervisor.states import SlotState
from mlx_supervisor.gateway.supervisor.transport import Transport
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config

TICK = 0.2


class Supervisor:
    def __init__(self, cfg: Config, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
                 endpoint: str, bus: Bus, launcher: Launcher | None = None):
        self.cfg = cfg
        self.bus = bus  # the gateway's: it publishes there, and owns nothing of it
        self.transport = Transport(endpoint, self._on_transport_control, cfg.stream_buffer)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.launcher: Launcher = launcher or ExecLauncher(cfg, endpoint)
        self.fx = ProcessEffects(self.transport, self.launcher, self.bus,
                                 self.events.put_nowait, cfg.stop_grace)
        self.core = Core.build(cfg, entries, aliases, budget, self.fx)
        self.core.held = self.launcher.held_bytes  # the zygote is in the ledger
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # Read-only views of the loop's state, for the routes and the observers.
    @property
    def slots(self) -> dict[str, Slot]:
        return self.core.slots

    @property
    def workers(self) -> dict[str, Worker]:
        return self.core.workers

    @property
    def budget(self) -> int:
        return self.core.budget

    @property
    def max_models(self) -> int:
        return self.core.max_models

    @property
    def closing(self) -> bool:
        return self.core.closing

    def used_bytes(self) -> int:
        return self.core.used_bytes()

    # ------------------------------------------------------------ public API (any task)

    async def start(self) -> None:
        self.transport.start()
        self.launcher.start()
        self._task = asyncio.create_task(self._run(), name="supervisor")
        self._ticker = asyncio.create_task(self._tick_loop(), name="supervisor-tick")
        for slot in self.core.slots.values():
            if slot.pinned:
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
                self.events.put_nowait(LoadCmd(slot.entry.id, None, fut))

    def resolve(self, name: str) -> str | None:
        if name in self.core.slots:
            return name
        return self.core.aliases.get(name)

    async def acquire(self, model_id: str, request_id: str) -> Lease:
        """Wait for a worker of ``model_id`` with a free concurrency slot; bounded by queue_timeout."""
        if self.core.closing or self._task is None or self._task.done():
            raise shutting_down()
        waiter = Waiter(asyncio.get_running_loop().create_future(), request_id)
        self.events.put_nowait(Acquire(model_id, waiter))
        try:
            lease: Lease = await asyncio.wait_for(asyncio.shield(waiter.fut), self.cfg.queue_timeout)
        except asyncio.TimeoutError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise self._timed_out(model_id) from None
        except asyncio.CancelledError:
            self.events.put_nowait(Abandon(model_id, waiter))
            raise
        task = asyncio.current_task()
        if task is not None and getattr(task, "cancelling", lambda: 0)():
            # Cancelled as the grant landed (wait_for returned the result): hand it back.
            self.events.put_nowait(Abandon(model_id, waiter))
            raise asyncio.CancelledError
        return lease

    async def _ask(self, make: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.events.put_nowait(make(fut))
        return await fut

    def _timed_out(self, model_id: str) -> APIError:
        """queue_timeout: for a model waiting for its turn at the memory, say so, with the
        expected wait as Retry-After (a read of the loop's state, never a write)."""
        slot = self.core.slots.get(model_id)
        msg = (f"model {model_id!r} did not become available within queue_timeout "
               f"({self.cfg.queue_timeout:g}s)")
        if slot is not None and slot.state is SlotState.WAITING:
            left = max(1.0, slot.eta - time.monotonic())
            return APIError(503, msg + f": its memory is held by busy models, its turn is expected "
                            f"in about {left:.0f}s", code="queue_timeout", retry_after=left)
        return APIError(503, msg, code="queue_timeout", retry_after=5)

    async def load(self, model_id: str, pin: bool | None = None) -> Worker:
        w: Worker = await self._ask(lambda f: LoadCmd(model_id, pin, f))
        return w

    async def unload(self, model_id: str) -> None:
        await self._ask(lambda f: UnloadCmd(model_id, f))

    def park(self, lease: Lease, parked: bool) -> None:
        """The request's stream fell behind (True) or caught up (False): see flow.py."""
        self.events.put_nowait(Park(lease, parked))

    def behind(self, lease: Lease, behind: bool) -> None:
        """The request's client stopped taking bytes (True) or took them (False): see flow.py."""
        self.events.put_nowait(Behind(lease, behind))

    async def cancel(self, request_id: str, reason: str = "cancelled") -> bool:
        return bool(await self._ask(lambda f: CancelCmd(request_id, reason, f)))

    async def reload(self, entries: dict[str, Entry], aliases: dict[str, str], budget: int,
                     max_models: int) -> None:
        await self._ask(lambda f: ReloadCmd(entries, aliases, budget, max_models, f))

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain in-flight requests up to ``grace``, then stop every worker and wait for the reaps."""
        if self._task is None or self._task.done():
            return
        g = self.cfg.shutdown_grace if grace is None else grace
        with contextlib.suppress(asyncio.CancelledError):
            await self._ask(lambda f: ShutdownCmd(g, f))
        for t in (self._ticker, self._task):
            if t:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await self.launcher.close()  # the zygote last: every worker is reaped by now
        await self.transport.close()

    # ------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            dispatch(self.core, await self.events.get())

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.events.put_nowait(Tick())

    def _on_transport_control(self, worker_id: str, msg: p.FromWorker) -> None:
        self.events.put_nowait(Control(worker_id, msg))

    # ------------------------------------------------------------ views (read-only)

    def snapshot(self) -> dict[str, Any]:
        return {**views.snapshot(self.core, self.started), "zygote": self.launcher.info()}

    def model_info(self, model_id: str) -> dict[str, Any]:
        return views.model_info(self.core, model_id)
