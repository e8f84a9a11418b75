"""Read-only views of the supervisor for /admin/ps, /v1/models and the status page.

Display only: nothing here gates a change, so reading outside the loop is safe.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from mlx_supervisor.gateway.supervisor.core import Core


def snapshot(sup: Core, started: float) -> dict[str, Any]:
    now = sup.now()
    workers = []
    for w in sup.workers.values():
        slot = sup.slots.get(w.model_id)
        ttl = slot.entry.ttl if slot else 0
        workers.append({
            "model": w.model_id, "spare": w.spare, "worker_id": w.worker_id, "pid": w.pid, "state": w.state.value,
            "kind": w.kind, "memory_bytes": w.memory.footprint if w.memory else 0,
            "estimated_bytes": w.estimate, "charged_bytes": w.bytes,
            "learned_bytes": slot.learned if slot else 0, "via": getattr(w.proc, "via", None),
            "memory": {"active": w.memory.active, "cache": w.memory.cache, "peak": w.memory.peak,
                       "rss": w.memory.rss} if w.memory else None,
            "pinned": bool(slot and slot.pinned), "inflight": w.inflight, "parked": w.parked,
            "worker_inflight": w.worker_inflight,
            "queued": len(slot.waiters) if slot else 0,
            "last_used": time.time() - (now - w.last_used_mono),
            "idle_seconds": round(now - w.last_used_mono, 3),
            "ttl": ttl,
            "ttl_remaining": (max(0.0, ttl - (now - w.last_used_mono)) if ttl > 0 and not (slot and slot.pinned)
                              and w.inflight == 0 else None),
            "started_at": w.started_at, "load_seconds": w.load_seconds,
            "ranks": [msgspec.structs.asdict(r) for r in w.ranks],
        })
    return {
        "pid": os.getpid(), "uptime": time.time() - started, "budget_bytes": sup.budget,
        "used_bytes": sup.used_bytes(), "max_models": sup.max_models, "workers": workers,
        "last_errors": {m: s.last_detail or s.last_error for m, s in sup.slots.items()
                        if s.last_error or s.last_detail},
    }

def model_info(sup: Core, model_id: str) -> dict[str, Any]:
    """A model's worker state when it has one, else its slot's (cold, pending, backing_off,
    failed)."""
    slot = sup.slots[model_id]
    w = slot.worker
    state = w.state.value if w else slot.state.value
    return {
        "state": state, "kind": slot.entry.kind, "pinned": slot.pinned,
        "memory": w.bytes if w else 0, "estimated_bytes": slot.entry.estimate,
        "learned_bytes": slot.learned, "needs_bytes": slot.need,
        "aliases": slot.entry.aliases, "pid": w.pid if w else None,
        "last_error": slot.last_error, "loads": slot.loads, "last_used": slot.last_used_wall,
        "context_length": (w.context_length if w else 0) or slot.entry.context_length,
    }
