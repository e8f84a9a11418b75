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


@dataclass(frozen=True)
class Usage:
    """One live worker as the over-budget policy sees it (after admission, as it grows)."""

    id: str
    bytes: int
    estimate: int
    last_used: float
    idle: bool  # ready with nothing in flight (or a warm spare)
    pinned: bool = False
    stopping: bool = False
    ready: bool = True
    recycling: bool = False


def relieve(usages: Sequence[Usage], budget: int) -> tuple[list[str], str | None]:
    """Workers grow after admission (KV cache, buffers). When the measured total is over the
    budget: evict idle unpinned workers, least recently used first; if that is not enough, pick
    the worker that grew most past its estimate to recycle once its requests finish.

    Returns ``(ids to evict now, id to recycle or None)``. Bytes already stopping count as freed.
    """
    over = sum(u.bytes for u in usages) - budget
    over -= sum(u.bytes for u in usages if u.stopping)
    evict: list[str] = []
    for u in sorted((u for u in usages if u.idle and not u.pinned and not u.stopping),
                    key=lambda u: u.last_used):
        if over <= 0:
            break
        evict.append(u.id)
        over -= u.bytes
    if over <= 0:
        return evict, None
    growers = [u for u in usages if u.ready and not u.recycling and not u.stopping
               and u.id not in evict and u.bytes > u.estimate]
    if not growers:
        return evict, None
    return evict, max(growers, key=lambda u: u.bytes - u.estimate).id
