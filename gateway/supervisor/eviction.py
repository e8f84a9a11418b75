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


# ---------------------------------------------------------------- recycling an evicted worker

RECYCLE_KINDS = frozenset({"lm", "vlm", "embeddings"})
"""Single-process kinds: any of them can be recycled into any other (an engine imports what its
kind needs at its load; an lm process that takes a vlm pays mlx_vlm's import once). Sharded
groups (``mlx.launch``), models with an ``env`` of their own (read at import time) and the
fake engine are never recycled."""
FLOOR_SLACK = 64 * 2**20


@dataclass(frozen=True)
class Reuse:
    """A model as recycling sees it: its kind, and whether it runs as one plain process (no
    ``env`` of its own, not sharded)."""

    kind: str
    plain: bool


def recyclable(old: Reuse, new: Reuse, recycles: int, limit: int) -> bool:
    """May a worker of ``old`` (recycled ``recycles`` times) unload and take ``new``?"""
    return (limit > 0 and recycles < limit and old.plain and new.plain
            and old.kind in RECYCLE_KINDS and new.kind in RECYCLE_KINDS)


def keep_unloaded(footprint: int, floor: int, baseline: int) -> bool:
    """After an unload: keep the process only if it got back near a model-free footprint: its
    first unload's figure (``floor``) plus 25% and ``FLOOR_SLACK``; on the first, 8× the worker
    baseline (a CUDA process holds ~1.1 GB with no model). Past that it leaks (or fragments),
    and is stopped, as an eviction always did."""
    ceiling = floor * 5 // 4 + FLOOR_SLACK if floor else 8 * baseline
    return 0 < footprint <= ceiling
