"""``python -m mlx_supervisor.worker.archcheck DIR KIND``: can this worker run that model?

A pull asks this after the small files (config, tokenizer) are in and before any weights are
fetched. The answer comes from the MLX libraries' own resolvers (the functions their ``load``
calls), so a new architecture in mlx-lm is known here without a list of ours. Exit 0 when known;
else exit 1 with the reason on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def check(path: Path, kind: str) -> str | None:
    """None when the library for ``kind`` resolves the model's architecture, else why not."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"config.json is unreadable: {e}"
    if not isinstance(config, dict) or not config.get("model_type"):
        return "config.json names no model_type"
    try:
        if kind == "vlm":
            from mlx_vlm.utils import get_model_and_args
            get_model_and_args(config)
        elif kind == "embeddings":
            from mlx_embeddings.utils import _get_classes as embed_classes
            embed_classes(config)
        else:
            from mlx_lm.utils import _get_classes as lm_classes
            lm_classes(config)
    except ImportError as e:
        return f"the {kind} engine is not installed here ({e.name})"
    except (ValueError, KeyError) as e:
        return f"unknown architecture {config.get('model_type')!r} for a {kind} model ({e})"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    why = check(Path(args[0]), args[1] if len(args) > 1 else "lm")
    if why:
        print(why)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
