"""Per-request sampling pieces for the LM engine, built from mlx-lm's own parts.

- :func:`sampler_for`: unseeded requests use ``make_sampler`` objects shared by identical
  settings (``GenerationBatch`` samples in one call when a batch shares one sampler object);
  seeded requests get their own key stream (``mx.random.key(seed)`` split once per token) with
  the same top-k/top-p/min-p filters, so they can join the batch and still reproduce exactly,
  independently of what else runs.
- :func:`token_logprob`: a token's logprob and its top alternatives, as text.

The decoded-text stop check (and the thinking / tool-call split) is the engines' shared token
step, :class:`base.TokenStep`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from mlx_supervisor.shared.protocol import Generate, TokenLogprob

Sampler = Callable[[mx.array], mx.array]

# The context the engine gives make_logits_processors' penalties (mlx-lm's default).
PENALTY_CONTEXT = 20

_shared: dict[tuple, Sampler] = {}


def sampler_for(req: Generate, vocab_size: int) -> Sampler:
    temp, top_p, min_p = float(req.temperature), float(req.top_p), float(req.min_p)
    top_k = req.top_k if 0 < req.top_k < vocab_size else 0
    if temp == 0:
        return make_sampler(0.0)  # mlx-lm's greedy_sampler, one shared object
    if req.seed is None:
        key = (temp, top_p, min_p, top_k)
        s = _shared.get(key)
        if s is None:
            if len(_shared) > 64:
                _shared.clear()
            s = _shared[key] = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
        return s
    return _seeded_sampler(req.seed, temp, top_p, min_p, top_k)


def _seeded_sampler(seed: int, temp: float, top_p: float, min_p: float, top_k: int) -> Sampler:
    filters: list[Callable[[mx.array], mx.array]] = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    return SeededSampler(seed, temp, filters)


class SeededSampler:
    """A request's own key stream: one split per token. ``rewind`` takes back the last draw,
    for a token computed ahead and then discarded (:meth:`Solo.handover`)."""

    def __init__(self, seed: int, temp: float,
                 filters: list[Callable[[mx.array], mx.array]]) -> None:
        self.key = self.prev = mx.random.key(seed & 0xFFFFFFFFFFFFFFFF)
        self.inv_temp, self.filters = 1.0 / temp, filters

    def __call__(self, logprobs: mx.array) -> mx.array:
        for f in self.filters:
            logprobs = f(logprobs)
        self.prev = self.key
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inv_temp, key=sub)

    def rewind(self) -> None:
        self.key = self.prev


def token_logprob(tokenizer: Any, logprobs: mx.array, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's logprob and the ``top_n`` most likely alternatives (as text)."""
    top: list[tuple[str, float]] = []
    if top_n > 0:
        idx = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        vals = logprobs[idx]
        order = mx.argsort(-vals)
        ids: Any = idx[order].tolist()
        lps: Any = vals[order].tolist()
        top = [(tokenizer.decode([i]), float(lp)) for i, lp in zip(ids, lps, strict=True)]
    chosen: Any = logprobs[token].item()
    return TokenLogprob(token=tokenizer.decode([token]), logprob=float(chosen), top=top)
