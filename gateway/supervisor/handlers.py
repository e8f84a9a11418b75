"""The supervisor's handler table: one entry per event type, and ``dispatch``, which the loop
calls for every event. An event with no handler, or a handler that raises, is logged and the
loop goes on: nothing a single event does may end the supervisor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mlx_supervisor.gateway.supervisor import admin, flow, lifecycle, requests, timers
from mlx_supervisor.gateway.supervisor import model as m
from mlx_supervisor.gateway.supervisor.core import Core

log = logging.getLogger("mlx_supervisor.supervisor")

Handler = Callable[[Core, Any], None]
HANDLERS: dict[type, Handler] = {
    m.Acquire: requests.on_acquire,
    m.Abandon: requests.on_abandon,
    m.Release: requests.on_release,
    m.Park: flow.on_park,
    m.Behind: flow.on_behind,
    m.Spawned: lifecycle.on_spawned,
    m.Control: lifecycle.on_control,
    m.Exited: lifecycle.on_exited,
    m.Tick: timers.on_tick,
    m.LoadCmd: admin.on_loadcmd,
    m.UnloadCmd: admin.on_unloadcmd,
    m.CancelCmd: admin.on_cancelcmd,
    m.ReloadCmd: admin.on_reloadcmd,
    m.ShutdownCmd: admin.on_shutdowncmd,
}


def dispatch(core: Core, ev: object) -> None:
    try:
        handler = HANDLERS[type(ev)]
    except KeyError:
        log.error("supervisor: no handler for event %s; dropped", type(ev).__name__)
        return
    try:
        handler(core, ev)
    except Exception:
        log.exception("supervisor handler %s failed", type(ev).__name__)
