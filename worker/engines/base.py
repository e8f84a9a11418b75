"""The interface every engine (lm, vlm, embeddings, fake) implements.

An engine is driven by the worker's MLX thread only: ``load``, ``submit``, ``cancel``, ``step``
and ``close`` are never called from any other thread. ``emit`` hands a message to the io thread
and is safe to call from the MLX thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from mlx_supervisor.shared.protocol import Embed, FromWorker, Generate, Memory

Emit = Callable[[FromWorker], None]


class LoadInfo(msgspec.Struct):
    kind: str
    context_length: int = 0
    embedding_dims: int = 0


class Engine(Protocol):
    def load(self, path: str) -> LoadInfo:
        """Load weights; raise any exception with a readable message on failure."""
        ...

    def submit(self, req: Generate | Embed, emit: Emit) -> None:
        """Accept a request. Bad input is answered with ``emit(Error(..., status=400))``."""
        ...

    def cancel(self, request_id: str, emit: Emit) -> None:
        """Drop a request (queued or running) before its next decode step; emits nothing more for it."""
        ...

    def has_work(self) -> bool: ...

    def step(self, emit: Emit) -> None:
        """Advance every running request by about one decode step, emitting chunks/done/errors."""
        ...

    def memory(self) -> Memory:
        """Current figures; safe to call from the MLX thread between steps."""
        ...

    def close(self) -> None: ...
