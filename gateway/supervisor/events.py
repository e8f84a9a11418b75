"""What the supervisor tells its observers, through the gateway's bus (``Effects.emit``).

Each event is a frozen msgspec Struct; ``kind`` is the name the status page's event stream
shows. They report what happened and carry no handles back into the supervisor.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec


class SupervisorEvent(msgspec.Struct, frozen=True, kw_only=True):
    kind: ClassVar[str] = ""
    model: str


class Queued(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "queued"
    request_id: str


class Granted(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "granted"
    request_id: str
    pid: int | None
    waited: float


class Spawning(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "spawning"
    spare: bool = False


class WorkerEvent(SupervisorEvent, frozen=True, kw_only=True):
    """About one worker process (``pid`` None: it had none yet)."""

    pid: int | None


class WorkerReady(WorkerEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "ready"
    load_seconds: float
    bytes: int


class Evicted(WorkerEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "evicted"
    reason: str


class TtlExpired(WorkerEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "ttl"


class WorkerExited(WorkerEvent, frozen=True, kw_only=True):
    """A worker process ended: asked to (``WorkerStopped``) or not (``WorkerCrashed``)."""

    reason: str
    returncode: int


class WorkerStopped(WorkerExited, frozen=True, kw_only=True):
    kind: ClassVar[str] = "stopped"


class WorkerCrashed(WorkerExited, frozen=True, kw_only=True):
    kind: ClassVar[str] = "crashed"


class Transitioned(WorkerEvent, frozen=True, kw_only=True):
    """A worker's state moved (states.transition)."""

    kind: ClassVar[str] = "transition"
    worker_id: str
    old: str
    new: str
    reason: str
