"""Every side effect the supervisor's handlers ask for, behind one ``Effects`` object.

Handlers decide; an ``Effects`` acts. ``ProcessEffects`` is the real one: processes (through a
``spare.Launcher``), the transport's socket, tasks, and the gateway's bus. Tests pass a fake that
records the calls (tests/test_supervisor_unit.py), so a handler runs in-process with no socket,
no process and no task. Slow work (spawn, stop) runs in a task of its own and comes back to the
loop as an event (``Spawned``, ``Exited``) through ``post``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from mlx_supervisor.gateway.bus import Bus
from mlx_supervisor.gateway.catalog import Entry
from mlx_supervisor.gateway.supervisor.events import SupervisorEvent
from mlx_supervisor.gateway.supervisor.model import Event, Exited, Spawned, Worker
from mlx_supervisor.gateway.supervisor.process import WorkerProcess
from mlx_supervisor.gateway.supervisor.transport import Transport
from mlx_supervisor.shared import protocol as p

if TYPE_CHECKING:
    from mlx_supervisor.gateway.supervisor.spare import Launcher

log = logging.getLogger("mlx_supervisor.supervisor")


class Effects(Protocol):
    def spawn(self, worker: Worker, entry: Entry | None) -> None:
        """Start ``worker``'s process (``entry`` None: a warm spare); ``Spawned``, then
        ``Exited``, come back as events."""

    def stop(self, worker: Worker) -> None:
        """The bounded stop path (Shutdown, SIGTERM, SIGKILL, reap); ``Exited`` comes back."""

    def kill(self, worker: Worker) -> None:
        """SIGKILL the worker's process group now."""

    def send(self, worker_id: str, msg: p.ToWorker) -> bool: ...
    def allow(self, worker_id: str) -> None: ...
    def forget(self, worker_id: str) -> None: ...

    def fail_streams(self, worker_id: str, message: str, code: str = "worker_crashed") -> int:
        """End every open request stream of a worker with an error; returns how many."""

    def fail_request(self, request_id: str, message: str, code: str, status: int) -> bool: ...

    def hold(self, request_id: str, held: bool) -> None:
        """Pause a request in its worker because it is parked (True), or let it go (False)."""

    def streams_of(self, worker_id: str) -> list[str]: ...

    def emit(self, ev: SupervisorEvent) -> None:
        """Tell the observers (the gateway's bus)."""

    def post(self, ev: Event) -> None:
        """Put an event on the supervisor's own queue (a lease's release)."""


class ProcessEffects:
    """The real effects: worker processes, the ROUTER socket, tasks, the bus."""

    def __init__(self, transport: Transport, launcher: Launcher, bus: Bus,
                 post: Callable[[Event], None], stop_grace: float):
        self.transport = transport
        self.launcher = launcher
        self.bus = bus
        self.post = post
        self.stop_grace = stop_grace
        self._tasks: set[asyncio.Task[Any]] = set()

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def spawn(self, worker: Worker, entry: Entry | None) -> None:
        self._task(self._run_process(worker, entry))

    async def _run_process(self, worker: Worker, entry: Entry | None) -> None:
        try:
            wp = await self.launcher.launch(worker, entry)
        except Exception as exc:  # e.g. interpreter missing, fork failure
            self.post(Spawned(worker, None, f"could not start worker: {exc}"))
            return
        self.post(Spawned(worker, wp))
        rc = await wp.wait()
        self.post(Exited(worker, rc))

    def stop(self, worker: Worker) -> None:
        wp = worker.proc
        assert isinstance(wp, WorkerProcess)
        shutdown = p.Shutdown(reason=worker.stop_reason or "")
        self._task(self._stop(wp, worker.worker_id, shutdown))

    async def _stop(self, wp: WorkerProcess, worker_id: str, msg: p.Shutdown) -> None:
        await wp.stop(lambda: self.transport.send(worker_id, msg), self.stop_grace)

    def kill(self, worker: Worker) -> None:
        if isinstance(worker.proc, WorkerProcess):
            worker.proc.signal_group(signal.SIGKILL)

    def send(self, worker_id: str, msg: p.ToWorker) -> bool:
        return self.transport.send(worker_id, msg)

    def allow(self, worker_id: str) -> None:
        self.transport.allow(worker_id)

    def forget(self, worker_id: str) -> None:
        self.transport.forget(worker_id)

    def fail_streams(self, worker_id: str, message: str, code: str = "worker_crashed") -> int:
        return self.transport.fail_worker(worker_id, message, code)

    def fail_request(self, request_id: str, message: str, code: str, status: int) -> bool:
        return self.transport.fail_request(request_id, message, code=code, status=status)

    def hold(self, request_id: str, held: bool) -> None:
        self.transport.hold(request_id, held)

    def streams_of(self, worker_id: str) -> list[str]:
        return self.transport.streams_of(worker_id)

    def emit(self, ev: SupervisorEvent) -> None:
        self.bus.publish(ev)
