"""Wired memory on Metal for as long as a model is loaded.

mlx-lm's own loops wire the model: ``stream_generate`` runs inside
``mlx_lm.generate.wired_limit`` and ``BatchGenerator`` calls
``maybe_set_recommended_wired_limit`` for its lifetime. A bare ``generate_step`` loop (the LM
engine's solo path), mlx-vlm's per-request ``stream_generate`` and mlx-embeddings set
neither, so each engine holds mlx-lm's ``wired_limit`` from the end of its load to its close:
every path (solo, batch, vision, embeddings) then runs inside the recommended limit. Where the
device reports no ``max_recommended_working_set_size`` (CPU, CUDA) the same calls are made and
mlx-lm makes them a no-op.
"""

from __future__ import annotations

import contextlib
from typing import Any

from mlx_lm.generate import wired_limit


class Wired:
    """``hold(model)`` enters ``wired_limit(model)``; ``release()`` leaves it (idempotent)."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    def hold(self, model: Any, streams: list[Any] | None = None) -> None:
        self.release()
        stack = contextlib.ExitStack()
        stack.enter_context(wired_limit(model, streams))
        self._stack = stack

    def release(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    @property
    def held(self) -> bool:
        return self._stack is not None
