"""detect_kind: the engine a model directory needs, from its files (no mlx involved)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_supervisor.shared.model_kind import detect_kind


def model(tmp_path: Path, config: dict | str | None, *files: str) -> Path:
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
    for name in files:
        (tmp_path / name).write_text("{}")
    return tmp_path


def test_real_models(vlm_model_dir: Path, embeddings_model_dir: Path, tmp_path: Path) -> None:
    assert detect_kind(vlm_model_dir) == "vlm"
    assert detect_kind(embeddings_model_dir) == "embeddings"
    # The same MiniLM without its sentence-transformers files is still an encoder.
    shutil.copy(embeddings_model_dir / "config.json", tmp_path / "config.json")
    assert detect_kind(tmp_path) == "embeddings"


@pytest.mark.parametrize(
    ("config", "files", "kind"),
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, (), "lm"),
        ({"model_type": "llava", "vision_config": {"hidden_size": 8}}, (), "vlm"),
        ({"model_type": "llava", "mm_vision_tower": "openai/clip"}, (), "vlm"),
        ({"model_type": "gemma3_text", "vision_config": None}, (), "lm"),
        ({"model_type": "xlm-roberta"}, (), "embeddings"),
        ({"architectures": ["ModernBertModel"]}, (), "embeddings"),
        # Packaged for sentence-transformers: vectors, even from a decoder or a VLM backbone.
        ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, ("modules.json",),
         "embeddings"),
        ({"model_type": "qwen2_vl", "vision_config": {"depth": 2}},
         ("config_sentence_transformers.json",), "embeddings"),
        (None, (), "lm"),
        ("not json", (), "lm"),
        ("[1, 2]", (), "lm"),
    ],
)
def test_configs(tmp_path: Path, config: dict | str | None, files: tuple[str, ...],
                 kind: str) -> None:
    assert detect_kind(model(tmp_path, config, *files)) == kind


def test_imports_no_mlx() -> None:
    code = ("import sys; import mlx_supervisor.shared.model_kind; "
            "print(any(m.split('.')[0] in ('mlx', 'transformers') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
