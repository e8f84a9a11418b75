"""One request decoded alone by mlx-lm's ``generate_step``, the loop ``stream_generate`` runs.

Why: ``BatchGenerator`` holding a single sequence still pays for the batch (a left-padded
``BatchKVCache``, masks, per-row bookkeeping); on an H200 that ran at 0.81 of
``stream_generate``. The LM engine decodes a lone request here, hands it to the batch the
moment a second one arrives (:meth:`Solo.handover`), so concurrent requests still share steps,
and takes the last one left in the batch back out (:func:`undo_lookahead` serves both moves).

What this adds around ``generate_step``:

- a prompt longer than ``prefill_step_size`` is prefilled one slice per engine step, so cancels
  and new arrivals are seen during a long prefill, as with the batch;
- ``max_tokens`` and token-level stop sequences are applied as ``GenerationBatch`` applies them;
- the penalty processors see the cached prefix too (``generate_step`` only tracks what it feeds);
- both loops compute one token ahead; a move undoes that lookahead (the KV cache is trimmed by
  one token and a seeded sampler's key rewound), so the other side recomputes it exactly.
  A cache that cannot be trimmed is handed over empty and re-prefilled: slower, still exact.
  A multi-token stop sequence half-matched at the handover is then caught by the engine's
  decoded-text check rather than the token matcher.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch, StopSequences, generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from mlx_supervisor.worker.engines.grammar import GrammarProcessor, Recorder
from mlx_supervisor.worker.engines.lm_sampling import PENALTY_CONTEXT

Response = GenerationBatch.Response


class Solo:
    """The single request being decoded outside the batch."""

    def __init__(self, model: Any, stream: Any, uid: int, rest: list[int], cache: Any,
                 cached: list[int], max_tokens: int, sampler: Any, processors: list[Any],
                 stop_seqs: StopSequences, prefill_step_size: int) -> None:
        self.model, self.stream, self.uid = model, stream, uid
        self.cache = cache if cache is not None else make_prompt_cache(model)
        self.fed = list(cached)  # tokens in the KV cache before generate_step starts
        self.rest = list(rest)  # prompt tokens still to feed
        self.generated: list[int] = []
        self.max_tokens = max_tokens
        self.sampler, self.processors = sampler, processors
        self.matcher = stop_seqs.matcher()
        self.prefill_step_size = prefill_step_size
        self.steps: Generator[tuple[Any, mx.array], None, None] | None = None

    def next(self) -> list[Response]:
        """One engine step: a prefill slice (no response) or one generated token."""
        if self.steps is None and len(self.rest) > self.prefill_step_size:
            n = self.prefill_step_size
            with mx.stream(self.stream):
                self.model(mx.array(self.rest[:n])[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])
            self.fed += self.rest[:n]
            del self.rest[:n]
            mx.clear_cache()
            return []
        if self.steps is None:
            self.steps = generate_step(
                mx.array(self.rest), self.model, self.stream, max_tokens=-1,
                sampler=self._sampler(), logits_processors=self._processors(),
                prompt_cache=self.cache, prefill_step_size=self.prefill_step_size)
        token, logprobs = next(self.steps)
        self.generated.append(token)
        finish = None
        if len(self.generated) >= self.max_tokens:
            finish = "length"
        if self.matcher.advance(token):
            finish = "stop"
        if finish is None:
            return [Response(self.uid, token, logprobs, None, None, None)]
        cache, tokens = self.end()
        return [Response(self.uid, token, logprobs, finish, cache, tokens)]

    def end(self) -> tuple[Any, list[int]]:
        """Stop decoding; the KV cache and the tokens it holds, for the prompt cache.

        The lookahead step has already fed the last generated token, so it is in the cache.
        """
        if self.steps is not None:
            self.steps.close()
        return self.cache, self.fed + self.rest + self.generated

    def handover(self) -> tuple[list[int], Any, list[int], int]:
        """Stop decoding here; what ``BatchGenerator.insert`` needs to continue exactly:
        (tokens to feed, cache or None, tokens in that cache, max_tokens left)."""
        if self.steps is None:  # still prefilling: nothing generated, nothing to undo
            return self.rest, self.cache, self.fed, self.max_tokens
        cache, tokens = self.end()
        rest, kept, cached = undo_lookahead(cache, tokens, self.sampler, self.processors)
        return rest, kept, cached, self.max_tokens - len(self.generated)

    def _sampler(self) -> Any:
        """The sampler; with a grammar, one that hands it each draw (:class:`Recorder`)."""
        g = self.processors[-1] if self.processors else None
        return Recorder(self.sampler, g) if isinstance(g, GrammarProcessor) else self.sampler

    def _processors(self) -> list[Any]:
        """The request's processors, with the already-fed context in front of what
        ``generate_step`` tracks (it starts from the tokens it is given). A grammar needs no
        context (it follows the draws), so it gets none: no concatenation per token."""
        if not self.processors or not self.fed:
            return self.processors
        prefix = mx.array(self.fed[-PENALTY_CONTEXT:])

        def with_prefix(p: Any) -> Any:
            if isinstance(p, GrammarProcessor):
                return p
            return lambda tokens, logits: p(mx.concatenate([prefix, tokens]), logits)

        return [with_prefix(p) for p in self.processors]


def undo_lookahead(cache: Any, tokens: list[int], sampler: Any,
                   processors: list[Any]) -> tuple[list[int], Any, list[int]]:
    """A decoder stopped one step ahead (``generate_step`` and ``GenerationBatch`` both feed
    the last token and draw the next before handing the last one out): take that step back so
    whoever continues recomputes it exactly. ``tokens`` are those in ``cache``, the last one
    handed out included; returns what :func:`refeed_last` returns. A seeded sampler redraws the
    discarded token; a grammar (:class:`grammar.GrammarProcessor`) must not consume the refed
    last token a second time."""
    for part in (sampler, *processors):
        rewind = getattr(part, "rewind", None)
        if rewind is not None:
            rewind()  # the discarded draw must be drawn again
    return refeed_last(cache, tokens)


def refeed_last(cache: Any, tokens: list[int]) -> tuple[list[int], Any, list[int]]:
    """Drop the last of ``tokens`` (those in ``cache``) from the cache, so that feeding it again
    yields the next token's logits: (tokens to feed, cache or None, tokens in that cache). A
    cache that cannot be trimmed comes back as None, for a fresh prefill of everything."""
    if can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 1) == 1:
        return tokens[-1:], cache, tokens[:-1]
    return tokens, None, []
