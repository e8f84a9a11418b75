"""``tool_choice`` auto, enforced lazily by the LM engine: a call the model opens is a valid call.

Until the model samples its tool-call start token the request has no grammar at all: no
processor, no matcher, no mask; the engine only compares each token it hands out with the
start token's id. When it sees it (outside thinking), the step that sampled it has already
computed the next token unconstrained (both decode loops run one step ahead), so the request
is re-entered as a hand-over re-enters it (:func:`lm_solo.undo_lookahead`: the KV cache trimmed
by one token, a seeded key rewound), now with a :class:`grammar.LazyCall` as its last
processor; the redrawn token is the first one the call's grammar masks. The processor then
stays with the request through every later move (batching, solo, pause), as any grammar does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mlx_supervisor.worker.engines.lm_solo import Solo, undo_lookahead

if TYPE_CHECKING:
    from mlx_supervisor.worker.engines.grammar import Grammars
    from mlx_supervisor.worker.engines.lm import _Running

log = logging.getLogger("mlx_supervisor.worker")


class LazyCalls:
    """Arming :class:`grammar.LazyCall` for :class:`lm.LMEngine`."""

    arming: list[tuple[_Running, int]]  # (request, its start token) seen this step: armed after it
    if TYPE_CHECKING:
        running: dict[int, _Running]
        solo: Solo | None
        gen: Any
        grammars: Grammars | None

        def _insert(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                    max_tokens: int) -> None: ...
        def _go_solo(self, st: _Running, rest: list[int], cache: Any, cached: list[int],
                     max_tokens: int) -> None: ...

    def _saw(self, st: _Running, token: int, before: str | None) -> None:
        """After ``token`` was handed out: arm the request if it opened a call (the grammar
        applies after thinking only, so not while ``before``, its text state, is reasoning)."""
        if token == st.trigger and before != "reasoning":
            st.trigger = None  # once armed, the processor itself follows later calls
            self.arming.append((st, token))

    def _arm(self) -> None:
        """Re-enter each request that opened a call this step, its call's grammar added."""
        for st, token in self.arming:
            if st not in self.running.values():  # ended or cancelled in this step
                continue
            assert self.grammars is not None
            proc = self.grammars.lazy_call(st.req, token)
            if proc is None:
                continue
            if self.solo is not None and self.solo.uid == st.uid:
                solo, self.solo = self.solo, None
                rest, cache, cached, left = solo.handover()
                st.processors.append(proc)  # last: nothing may lift its mask
                self._go_solo(st, rest, cache, cached, left)
            else:
                cache, tokens = self.gen.remove([st.uid], return_prompt_caches=True)[st.uid]
                rest, kept, cached = undo_lookahead(cache, list(tokens), st.sampler,
                                                    st.processors)
                st.processors.append(proc)
                self._insert(st, rest, kept, cached, st.max_tokens - st.completion)
            log.info("%s opened a tool call after %d tokens: enforced", st.req.id, st.completion)
        self.arming.clear()
