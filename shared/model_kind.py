"""Which engine a model directory needs ("lm", "vlm" or "embeddings"), from its files alone.

The gateway calls this when a config entry leaves ``kind`` out, before any worker exists, so
it reads JSON only (no mlx, no transformers). The order of the checks matters:

1. sentence-transformers files (``modules.json``, ``config_sentence_transformers.json``) mean
   "embeddings", even for a decoder or a vision backbone (Qwen3-Embedding, jina-v4): the
   author packaged it to be pooled into vectors, not to chat.
2. a vision tower in ``config.json`` (``vision_config`` and its aliases) means "vlm".
3. an encoder-only architecture (BERT and its relatives, by ``architectures`` or
   ``model_type``) means "embeddings".
4. anything else is "lm".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")
VISION_KEYS = ("vision_config", "vision_tower", "vision_tower_config", "mm_vision_tower",
               "visual", "vision_encoder")
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm_roberta", "distilbert", "modernbert", "mpnet",
    "nomic_bert", "electra", "deberta", "deberta-v2", "camembert", "albert",
})
ENCODER_ARCH_PREFIXES = ("Bert", "Roberta", "XLMRoberta", "DistilBert", "ModernBert", "MPNet",
                         "NomicBert", "Electra", "Deberta", "Camembert", "Albert")


def read_config(path: str | Path) -> dict[str, Any]:
    """The model's ``config.json`` as a dict; ``{}`` when it is missing or not a JSON object."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_encoder(config: dict[str, Any]) -> bool:
    if str(config.get("model_type", "")).lower() in ENCODER_MODEL_TYPES:
        return True
    archs = config.get("architectures") or []
    return any(isinstance(a, str) and a.startswith(ENCODER_ARCH_PREFIXES) for a in archs)


def detect_kind(path: str | Path) -> str:
    """``"embeddings"``, ``"vlm"`` or ``"lm"`` for the model directory at ``path``."""
    root = Path(path)
    if any((root / name).is_file() for name in SENTENCE_TRANSFORMERS_FILES):
        return "embeddings"
    config = read_config(root)
    if any(config.get(key) for key in VISION_KEYS):
        return "vlm"
    if _is_encoder(config):
        return "embeddings"
    return "lm"
