"""Choosing what to evict: pure functions over plain data, no I/O, no logging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """One hot worker as eviction sees it."""

    model_id: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # requests in flight or queued
    stopping: bool = False  # already on its way out; its bytes free up soon

    @property
    def evictable(self) -> bool:
        return not (self.pinned or self.busy or self.stopping)


@dataclass(frozen=True)
class Plan:
    victims: list[str]
    fits: bool
    """True when, once the victims (and workers already stopping) have exited, the need fits."""
    wait: bool
    """True when the need fits only after some worker's exit: the load must wait for reaps."""


def plan_admission(
    need: int, holders: Sequence[Holder], budget: int, max_models: int = 0
) -> Plan:
    """Least-recently-used victims so that ``need`` bytes and one more worker fit.

    Workers already stopping count as freed. Pinned and busy workers are never chosen.
    """
    used = sum(h.bytes for h in holders)
    freeing = sum(h.bytes for h in holders if h.stopping)
    count = sum(1 for h in holders if not h.stopping)
    victims: list[str] = []
    freed = freeing
    for h in sorted((h for h in holders if h.evictable), key=lambda h: h.last_used):
        over_bytes = used - freed + need > budget
        over_count = max_models > 0 and count + 1 > max_models
        if not (over_bytes or over_count):
            break
        victims.append(h.model_id)
        freed += h.bytes
        count -= 1
    fits = used - freed + need <= budget and (max_models <= 0 or count + 1 <= max_models)
    wait = fits and (bool(victims) or (freeing > 0 and used + need > budget)
                     or (max_models > 0 and sum(1 for _ in holders) + 1 > max_models))
    return Plan(victims=victims if fits else [], fits=fits, wait=wait)
