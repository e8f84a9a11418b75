"""Grammar rows in ``BatchGenerator`` without its per-row path: one mask for the whole batch.

``GenerationBatch._step`` slices the batch into rows and calls each row's processors one by one
as soon as any row has one; for a batch of constrained requests that per-row path costs far
more than llguidance does (bench/RESULTS.md). Here the batch's step hides each row's grammar
(:class:`grammar.GrammarProcessor`, always its row's last processor) from that loop and masks
the model's logits instead, before any other processor sees them: every matcher takes its row's
last token, writes its row of one llguidance bitmask, and one ``where`` (the Metal kernel where
present) applies it; llguidance's executor consumes and masks all rows in one call each. Other processors (penalties, logit bias) still run per row, for their rows
only; none of them can lift a -inf.

The hook is the model call inside ``_step`` (the one place between the forward pass and the
processors): for that step the batch's model is a :class:`_Masking` wrapper. Everything else
(insert, extend, filter, remove, caches) is mlx-lm's, so grammar state moves with its row.
A batch's first step (``GenerationBatch.__init__``, for rows that just joined) still runs the
processors per row; that step only masks, it consumes nothing.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch

from mlx_supervisor.worker.engines.grammar import GrammarProcessor
from mlx_supervisor.worker.engines.grammar_mask import masked


class _Masking:
    """The model for one step: its logits with the grammar rows masked."""

    def __init__(self, model: Any, rows: list[tuple[int, GrammarProcessor]]) -> None:
        self.model, self.rows = model, rows

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        return masked(self.rows, inputs.reshape(-1), self.model(inputs, cache=cache))


class MaskedBatch(GenerationBatch):
    """mlx-lm's generation batch, with its grammar rows masked as one batch."""

    def _step(self) -> Any:
        procs = self.logits_processors or []
        rows = [(e, ps[-1]) for e, ps in enumerate(procs)
                if ps and isinstance(ps[-1], GrammarProcessor)]
        if not rows:
            return super()._step()
        model = self.model
        self.model = _Masking(model, rows)  # type: ignore[assignment]
        grammar = {e for e, _ in rows}
        self.logits_processors = [ps[:-1] if e in grammar else ps for e, ps in enumerate(procs)]
        try:
            return super()._step()
        finally:
            self.model, self.logits_processors = model, procs


class Generator(BatchGenerator):
    """``BatchGenerator`` whose running batch is a :class:`MaskedBatch` (every new row is
    ``extend``-ed into it)."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._generation_batch = MaskedBatch.empty(self.model, self.sampler)
