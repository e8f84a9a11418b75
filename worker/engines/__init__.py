"""Engine factory: ``make_engine(kind)``, importing each engine module only when asked.

Lazy imports keep the fake engine free of mlx and let a warm spare import only what its kind
needs (:func:`preload`).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from mlx_supervisor.worker.engines.base import Engine

KINDS = ("lm", "vlm", "embeddings", "fake")

_ENGINES = {
    "lm": ("mlx_supervisor.worker.engines.lm", "LMEngine"),
    "vlm": ("mlx_supervisor.worker.engines.vlm", "VLMEngine"),
    "embeddings": ("mlx_supervisor.worker.engines.embeddings", "EmbeddingsEngine"),
    "fake": ("mlx_supervisor.worker.engines.fake", "FakeEngine"),
}

# Heavy third-party modules a warm spare imports ahead of its Load message.
_HEAVY = {
    "lm": ("mlx.core", "mlx_lm", "mlx_lm.generate", "mlx_lm.models.cache"),
    "vlm": ("mlx.core", "mlx_lm", "mlx_vlm"),
    "embeddings": ("mlx.core", "mlx_embeddings"),
    "fake": (),
}

log = logging.getLogger("mlx_supervisor.worker")

_sharding: Any = None  # an engine_sharded.ShardSpec once main() saw --ranks N > 1


def use_sharding(spec: Any) -> None:
    """Rank 0 of a sharded group: text models load with ``engine_sharded.ShardedEngine``."""
    global _sharding
    _sharding = spec


def make_engine(kind: str, *, context_length: int = 0) -> Engine:
    """A fresh engine of ``kind``. ``context_length`` (0: the model's own) goes to engines whose
    constructor takes it (lm, fake); the others read it from the model."""
    if kind not in _ENGINES:
        raise ValueError(f"unknown model kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "lm" and _sharding is not None:
        from mlx_supervisor.worker.engines.sharded import ShardedEngine

        return ShardedEngine(_sharding, context_length=context_length)
    module, cls_name = _ENGINES[kind]
    cls: Any = getattr(importlib.import_module(module), cls_name)
    if context_length and kind in ("lm", "fake"):
        return cls(context_length=context_length)
    return cls()


def preload(kind: str, start_device: bool = True) -> None:
    """Import ``kind``'s heavy modules now (warm spare); a missing optional extra is only logged,
    the Load that needs it will fail with a clear reason. Then start MLX's device (on CUDA the
    context and allocator take a few hundred ms), which a first load would otherwise pay; the
    zygote passes ``start_device=False``: it must fork before any device exists."""
    for name in (*_HEAVY.get(kind, ()), _ENGINES.get(kind, ("", ""))[0]):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            log.warning("preload of %s for kind %s failed: %s", name, kind, e)
    if start_device and "mlx.core" in _HEAVY.get(kind, ()):
        try:
            import mlx.core as mx

            mx.eval(mx.arange(8) + 1)
        except Exception as e:  # the Load will report a broken device with its own error
            log.warning("warming the MLX device failed: %s", e)
