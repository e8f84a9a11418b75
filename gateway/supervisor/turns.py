"""Fair admission under thrash: pure functions over plain data, no I/O, no logging.

``plan_admission`` only evicts idle workers, so when every holder is busy a cold model would
never get in. Instead it waits for a *turn*: a busy holder that has had at least ``min_turn``
seconds of memory since it loaded is asked to yield (drained between requests: its in-flight
requests finish, its new ones queue for its next turn). Fairness is by service received, as in
deficit round robin: waiting models are ordered by the seconds they have held memory in all
(least first; ties by the oldest waiter), and among the holders whose turn is over the one with
the most seconds in all yields first. Only the first waiting model makes holders yield, and it
alone may take memory that is being freed. So with equal demand the shares even out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """One worker (or an admission's reservation) holding memory, as the turn planner sees it."""

    model_id: str
    bytes: int
    served: float | None = None  # seconds since it became ready; None: loading, a reservation
    total: float = 0.0  # seconds this model has held memory in all, this turn included
    pinned: bool = False
    busy: bool = False  # requests in flight or queued (an idle one is for plan_admission)
    stopping: bool = False  # already leaving: its bytes are as good as free


@dataclass(frozen=True)
class Turn:
    fits_ever: bool
    """False: the need exceeds what can ever be free (the budget less the pinned models)."""
    victims: list[str]
    """Busy holders to drain now, longest-served first, so that the need fits once they exit."""
    wait: float
    """Expected seconds until the memory is free: the turns still to run out, plus ``drain``."""


def never_fits(need: int, holders: Sequence[Holder], budget: int, max_models: int = 0) -> bool:
    pinned = [h for h in holders if h.pinned]
    over_count = max_models > 0 and len(pinned) + 1 > max_models
    return need > budget - sum(h.bytes for h in pinned) or over_count


def plan_turn(need: int, holders: Sequence[Holder], budget: int, max_models: int = 0, *,
              min_turn: float, drain: float = 0.0) -> Turn:
    """The busy holders to drain for ``need`` bytes (and one more worker) to fit.

    Holders whose turn is over are taken first, most-served (``total``) first. Only those that are not pinned, not already
    leaving and have ``served >= min_turn`` are drained now; if those are not enough, none is (the need waits for more turns to run out, and
    ``wait`` says how long that should take). ``drain`` is the expected time for a drained
    holder's in-flight requests to finish and its process to exit.
    """
    if never_fits(need, holders, budget, max_models):
        return Turn(False, [], math.inf)
    used = sum(h.bytes for h in holders if not h.stopping)
    count = sum(1 for h in holders if not h.stopping)
    movable = sorted((h for h in holders if not h.pinned and not h.stopping and h.served is not None),
                     key=lambda h: ((h.served or 0.0) < min_turn, -h.total))
    chosen: list[Holder] = []
    for h in movable:
        if used + need <= budget and (max_models <= 0 or count + 1 <= max_models):
            break
        chosen.append(h)
        used -= h.bytes
        count -= 1
    fits = used + need <= budget and (max_models <= 0 or count + 1 <= max_models)
    if not fits:  # the rest is held by loads and reservations: wait for them to become holders
        return Turn(True, [], min_turn + drain)
    wait = max((min_turn - (h.served or 0.0) for h in chosen), default=0.0)
    ready = [h.model_id for h in chosen if (h.served or 0.0) >= min_turn]
    if len(ready) < len(chosen):
        return Turn(True, [], max(0.0, wait) + drain)
    return Turn(True, ready, drain)


@dataclass(frozen=True)
class Candidate:
    """A model waiting for memory, as the turn order sees it."""

    model_id: str
    total: float  # seconds it has held memory in all
    oldest_waiter: float  # when its oldest queued request arrived (monotonic)


def turn_order(waiting: Sequence[Candidate]) -> list[str]:
    """Least served first; among equals, the one that has waited longest."""
    return [c.model_id for c in sorted(waiting, key=lambda c: (c.total, c.oldest_waiter))]
