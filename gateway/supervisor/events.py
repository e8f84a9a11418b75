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


class WorkerReady(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "ready"
    pid: int | None
    load_seconds: float
    bytes: int


class Evicted(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "evicted"
    pid: int | None
    reason: str


class TtlExpired(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "ttl"
    pid: int | None


class WorkerStopped(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "stopped"
    pid: int | None
    reason: str
    returncode: int


class WorkerCrashed(SupervisorEvent, frozen=True, kw_only=True):
    kind: ClassVar[str] = "crashed"
    pid: int | None
    reason: str
    returncode: int


class Transitioned(SupervisorEvent, frozen=True, kw_only=True):
    """A worker's state moved (states.transition)."""

    kind: ClassVar[str] = "transition"
    worker_id: str
    pid: int | None
    old: str
    new: str
    reason: str
