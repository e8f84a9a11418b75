"""``tool_choice`` auto, enforced lazily by the LM engine: a call the model opens is a valid call.

Until the model samples its tool-call start token the request has no grammar at all: no
processor, no matcher, no mask; the engine only compares each token it hands out with the
start token's id. When it sees it (outside thinking), the step that sampled it has already
computed the next token unconstrained (both decode loops run one step ahead), so the request
is re-entered as a hand-over re-enters it (:func:`lm_solo.undo_lookahead`: the KV cache trimmed
by one token, a seeded key rewound), now with a :class:`grammar.LazyCall` as its last
processor; the redrawn token is the first one the call's grammar masks. The processor then
stays with the request through every later move (batching, solo, pause), as any grammar does.

After the call: with ``parallel_tool_calls`` the row is free again (unmasked; the processor
only watches for the next start token, which opens a new call with a fresh matcher); without,
only EOS follows, so the turn ends after one call, as ``parallel_tool_calls: false`` promises.
A start token sampled inside thinking does not arm it (a grammar applies after thinking only),
nor one inside the unenforced call that thinking opened.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mlx_supervisor.shared import grammar
from mlx_supervisor.shared.protocol import Generate
from mlx_supervisor.worker.engines.grammar import GrammarProcessor, Grammars, call_terms
from mlx_supervisor.worker.engines.lm_solo import Solo, undo_lookahead

if TYPE_CHECKING:
    from mlx_supervisor.worker.engines.lm import _Running

log = logging.getLogger("mlx_supervisor.worker")


def trigger(grammars: Grammars, req: Generate) -> int | None:
    """The token that arms a :class:`LazyCall` for ``req`` (its model's tool-call start, one
    token), or None when ``req`` is not a chat with ``tool_choice`` auto alone whose calls a
    grammar can enforce (``response_format`` with tools is one grammar from the start)."""
    tokenizer = grammars.tokenizer
    if req.messages is None or not req.tools or req.tool_choice != "auto" \
            or req.json_format is not None or call_terms(tokenizer) is None:
        return None
    ids = tokenizer.encode(tokenizer.tool_call_start, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


class LazyCall(GrammarProcessor):
    """One call the model opened itself, enforced from the token after its start marker on
    (its first call is a fresh one: the start token is behind it). ``lark`` is the rest of one
    call (:func:`shared.grammar.call_lark`); each call gets a fresh copy of its matcher."""

    def __init__(self, grammars: Grammars, lark: str, start: int, parallel: bool) -> None:
        super().__init__(grammars.matcher(lark), grammars.vocab_size, grammars.eos, None,
                         grammars.n_vocab)
        self.grammars, self.lark, self.start, self.parallel = grammars, lark, start, parallel
        self.free = False

    @classmethod
    def build(cls, grammars: Grammars, req: Generate, start: int) -> LazyCall | None:
        """None (logged) if the grammar does not compile: the call then stays unenforced."""
        terms = call_terms(grammars.tokenizer)
        assert terms is not None
        try:
            return cls(grammars, grammar.call_lark(req, terms[1]), start, req.parallel_tool_calls)
        except ValueError as e:
            log.warning("%s: the tool-call grammar does not compile (%s); not enforced", req.id, e)
            return None

    def to_consume(self, last: int) -> int | None:
        if self.free and not self.fresh:
            if last == self.start:  # another call opens: enforce it from the next token
                self.matcher, self.free = self.grammars.matcher(self.lark), False
            return None
        return super().to_consume(last)

    def idle(self) -> bool:
        if self.parallel and not self.free and not self.matcher.is_error() \
                and self.matcher.is_accepting():
            self.free = True  # the call is complete: the model is free again
        return self.free


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
        """After ``token`` was handed out: arm the request if it opened a call from answer text
        (``before``, its text state, is ``normal``): a grammar applies after thinking only, and
        a start token inside a call opened there is that call's text."""
        if token == st.trigger and before == "normal":
            st.trigger = None  # once armed, the processor itself follows later calls
            self.arming.append((st, token))

    def _arm(self) -> None:
        """Re-enter each request that opened a call this step, its call's grammar added."""
        for st, token in self.arming:
            if not any(r is st for r in self.running.values()):  # ended or cancelled now
                continue
            assert self.grammars is not None
            proc = LazyCall.build(self.grammars, st.req, token)
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
