"""The demo llama: deterministic bytes, idempotent build, and mlx-lm loads and runs it."""

from __future__ import annotations

from pathlib import Path

import mlx_lm

from mlx_supervisor.worker.demo import lm as demo_model


def _files(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in demo_model.FILES}


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, demo_model_dir: Path):
    again = demo_model.build(tmp_path / "again", seed=0)
    assert _files(again) == _files(demo_model_dir)
    other = demo_model.build(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_complete_model_is_not_rebuilt(tmp_path: Path):
    d = demo_model.build(tmp_path / "m")
    before = {f: (d / f).stat().st_mtime_ns for f in demo_model.FILES}
    assert demo_model.build(d) == d
    assert {f: (d / f).stat().st_mtime_ns for f in demo_model.FILES} == before


def test_mlx_lm_loads_and_generates(demo_model_dir: Path):
    model, tok = mlx_lm.load(str(demo_model_dir))
    assert tok.has_chat_template
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                  add_generation_prompt=True, tokenize=True)
    assert tok.decode(ids) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    steps = list(mlx_lm.stream_generate(model, tok, ids, max_tokens=24))
    assert len(steps) == 24 and steps[-1].finish_reason == "length"  # greedy never picks EOS
    text = "".join(s.text for s in steps)
    assert len(set(s.token for s in steps)) > 2, text  # not one token over and over
    assert text.replace("\n", " ").isprintable()
