"""Flow control for the LM engine: a sequence whose stream's reader fell behind sits out of the
decode steps until the reader catches up, so it costs the batch nothing and its output does
not pile up anywhere.

``pause`` takes the sequence out as a hand-over does (:mod:`lm_solo`): out of the solo loop
with :meth:`Solo.handover`, or out of ``BatchGenerator`` with ``remove(...,
return_prompt_caches=True)`` and :func:`undo_lookahead`. Its KV cache is kept, the lookahead
step undone (a seeded key and a grammar matcher rewound), so ``resume`` feeds the last token
again, alone or into the batch, and the sequence goes on with exactly the tokens it would have
produced. A batch row still prefilling cannot leave mid-prompt (``BatchGenerator`` gives back
no unfed remainder), so it is paused at its first token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlx_supervisor.worker.engines.lm_solo import Solo, undo_lookahead

if TYPE_CHECKING:
    from mlx_supervisor.worker.engines.lm import _Running

log = logging.getLogger("mlx_supervisor.worker")


@dataclass
class Paused:
    """A sequence out of the decode steps: what ``BatchGenerator.insert`` needs to go on."""

    st: _Running
    rest: list[int]
    cache: Any
    cached: list[int]


class FlowControl:
    """``pause``/``resume`` for :class:`lm.LMEngine` (the worker calls them on Pause/Resume)."""

    paused: dict[str, Paused]
    pausing: set[str]  # paused while prefilling in the batch: taken out at its first token
    if TYPE_CHECKING:
        running: dict[int, _Running]
        by_id: dict[str, int]
        solo: Solo | None
        gen: Any

        def _leave_batch(self) -> None: ...
        def _maybe_idle(self) -> None: ...
        def _handover(self) -> None: ...
        def _insert(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                    max_tokens: int) -> None: ...
        def _go_solo(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                     max_tokens: int) -> None: ...

    def pause(self, request_id: str) -> bool:
        """Take the sequence out of the steps, its KV cache kept, until ``resume``."""
        uid = self.by_id.get(request_id)
        if uid is None:
            return True
        st = self.running[uid]
        if self.solo is not None and self.solo.uid == uid:
            solo, self.solo = self.solo, None
            rest, cache, cached, _ = solo.handover()
        elif st.here == 0:
            self.pausing.add(request_id)
            return True
        else:
            cache, tokens = self.gen.remove([uid], return_prompt_caches=True)[uid]
            rest, cache, cached = undo_lookahead(cache, list(tokens), st.sampler, st.processors)
        del self.running[uid]
        del self.by_id[request_id]
        self.paused[request_id] = Paused(st, rest, cache, cached)
        log.info("%s paused after %d tokens", request_id, st.completion)
        self._leave_batch()
        self._maybe_idle()
        return True

    def resume(self, request_id: str) -> None:
        """The reader caught up: the sequence goes on where it stopped, alone or in the batch."""
        self.pausing.discard(request_id)
        p = self.paused.pop(request_id, None)
        if p is None:
            return
        left = p.st.max_tokens - p.st.completion
        if self.running:
            self._handover()
            self._insert(p.st, p.rest, p.cache, p.cached, left)
        else:
            self._go_solo(p.st, p.rest, p.cache, p.cached, left)
        log.info("%s resumed after %d tokens", request_id, p.st.completion)

    def _pause_pending(self) -> None:
        """After a step: pause the rows asked to pause while prefilling, now past it."""
        for rid in list(self.pausing):
            uid = self.by_id.get(rid)
            if uid is None or self.running[uid].here > 0:
                self.pausing.discard(rid)
                self.pause(rid)

    def _drop_paused(self, request_id: str) -> bool:
        """Cancel: forget a paused sequence (True if it was one)."""
        self.pausing.discard(request_id)
        if self.paused.pop(request_id, None) is None:
            return False
        log.info("%s cancelled while paused", request_id)
        return True
