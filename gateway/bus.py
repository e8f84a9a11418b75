"""The gateway's one event bus: typed events (msgspec Structs) from the supervisor and the routes,
fanned out to the observers (metrics, status page, jobs, the ledger).

One bus per gateway, never process-global, so several gateways in one process (tests) see only
their own events. Observers are called in order on the event loop's thread and must be quick;
one that raises is logged with its name and the event, and the others still run. They never
feed back into the supervisor's loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

log = logging.getLogger("mlx_supervisor.bus")
E = TypeVar("E", bound=msgspec.Struct)


class Bus:
    def __init__(self) -> None:
        self._subs: list[tuple[type[Any], Callable[[Any], None]]] = []

    def subscribe(self, kind: type[E], fn: Callable[[E], None]) -> Callable[[], None]:
        """Call ``fn`` with every event that is a ``kind``; returns the unsubscribe."""
        entry = (kind, fn)
        self._subs.append(entry)
        return lambda: self._subs.remove(entry) if entry in self._subs else None

    def publish(self, ev: msgspec.Struct) -> None:
        for kind, fn in list(self._subs):
            if isinstance(ev, kind):
                try:
                    fn(ev)
                except Exception:
                    log.exception("observer %s failed on %s", getattr(fn, "__qualname__", fn),
                                  type(ev).__name__)
