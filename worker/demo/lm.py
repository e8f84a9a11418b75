"""Build a tiny, real llama-architecture model for tests and the ``--demo`` mode.

No model can be downloaded on the test machines, so this writes one: seeded random weights
(``model.safetensors``), a ``config.json`` and a real byte-level BPE tokenizer trained on a fixed
built-in corpus, with ChatML special tokens and chat template. ``mlx_lm.load(dir)`` loads it like
any downloaded model.

Properties tests rely on:
- same seed -> byte-identical files; a complete model already in place is left alone; the build
  happens in a temporary sibling directory that is renamed into place (atomic);
- the output rows of EOS (and of lone non-ASCII bytes and control characters) are zero, so
  greedy decoding never picks them by itself (tests force EOS with ``logit_bias``) and the text
  is printable; the output head is scaled so greedy text varies instead of repeating one token.

Usage: ``python -m mlx_supervisor.worker.demo.lm DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
VOCAB_TARGET = 768
CONTEXT = 2048
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|im_end|>"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model server keeps many models hot behind one port.
Each worker process owns one model, and unloading a model is as simple as ending its process.
Hello world! How are you today? I am fine, thank you. What is the weather like in the city?
It is sunny and warm, with a light breeze from the sea. The river runs past the old mill.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024. Dates like 2024-05-01 and times 12:30.
Code: def main(): return 0; for i in range(10): print(i); x = {"key": "value", "n": 3}.
Once upon a time there was a little robot who wanted to learn how to write stories.
The robot read books about mountains, oceans, forests, deserts, stars and small green frogs.
Every morning it counted the birds on the roof, and every evening it wrote one line of poetry.
Questions and answers: why is the sky blue? Because air scatters blue light more than red light.
Lists: apples, oranges, bananas, pears, plums, cherries, grapes, lemons, limes and melons.
Memory budgets, eviction, least recently used, time to live, heartbeats and graceful shutdown.
Streaming tokens one by one keeps the first byte fast; batching keeps the machine busy.
"""


def _corpus() -> list[str]:
    lines = _CORPUS.splitlines()
    # Repeat with variations so BPE finds enough merges for the target vocabulary.
    return lines + [ln.lower() for ln in lines] + [ln.upper() for ln in lines]


def _train_tokenizer(added: tuple[str, ...] = ()):  # -> tokenizers.Tokenizer
    """The BPE; ``added`` become added (non-special) tokens, as Qwen's ``<tool_call>`` are."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def _silenced(tok: Any) -> list[int]:
    """Token ids whose text alone is not clean: lone non-ASCII bytes, control characters and
    the special tokens. Their output rows are zero so random weights rarely pick them."""
    out = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        if i in {tok.token_to_id(t) for t in SPECIALS} or "\ufffd" in text or any(
                ord(c) < 32 and c != "\n" for c in text):
            out.append(i)
    return out


def _weights(vocab: int, silenced: list[int], seed: int, dims: dict[str, int] | None = None) -> dict:
    """Seeded random weights for every parameter of mlx-lm's llama with our config."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    cfg = _config(vocab, 0, dims)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    # Rows past the tokenizer's vocabulary (``vocab_size`` padding) are never picked either.
    silenced = silenced + list(range(vocab, int(cfg["vocab_size"])))
    rng = np.random.default_rng(seed)
    out = {}
    params: Any = tree_flatten(model.parameters())
    for name, p in sorted(params, key=lambda kv: kv[0]):
        shape = tuple(p.shape)
        if "norm" in name:
            arr = np.ones(shape, dtype=np.float32)
        elif name == "lm_head.weight":
            arr = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
            arr[silenced] = 0.0  # EOS (and junk bytes) never win greedy decoding on their own
        else:
            arr = rng.normal(0.0, 0.08, size=shape).astype(np.float32)
        out[name] = mx.array(arr)
    return out


def _config(vocab: int, eos_id: int, dims: dict[str, int] | None = None) -> dict:
    d = dims or {}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": d.get("hidden_size", HIDDEN),
        "num_hidden_layers": d.get("num_layers", LAYERS),
        "num_attention_heads": d.get("num_heads", HEADS),
        "num_key_value_heads": d.get("num_kv_heads", KV_HEADS),
        "intermediate_size": d.get("intermediate_size", INTERMEDIATE),
        "vocab_size": max(vocab, d.get("vocab_size", 0)),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": False,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in FILES)


def build(dir: str | Path, seed: int = 0, *, hidden_size: int | None = None,
          num_layers: int | None = None, num_heads: int | None = None,
          num_kv_heads: int | None = None, intermediate_size: int | None = None,
          vocab_size: int | None = None, added_tokens: tuple[str, ...] = (),
          chat_template: str = CHAT_TEMPLATE) -> Path:
    """Write the demo model into ``dir`` (created if needed) and return it.

    Skips the work when a complete model is already there, so concurrent test sessions can share
    a directory; a partial build never becomes visible under ``dir``.

    The keyword arguments make a bigger model of the same kind (benchmarks): ``vocab_size``
    pads the output head and embeddings past the tokenizer's ~768 tokens (padded rows are never
    picked). Left out, each keeps the tiny default, and the files are byte-identical to before.
    ``added_tokens`` and ``chat_template`` make the tool-calling variant (:mod:`.tools`).
    """
    import mlx.core as mx

    target = Path(dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tok = _train_tokenizer(added_tokens)
        vocab = tok.get_vocab_size()
        eos_id = tok.token_to_id(EOS)
        (tmp / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOS,
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": CONTEXT,
            "clean_up_tokenization_spaces": False,
            "chat_template": chat_template,
        }
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(tmp / "special_tokens_map.json",
                    {"eos_token": EOS, "pad_token": "<|endoftext|>"})
        dims = {k: v for k, v in (("hidden_size", hidden_size), ("num_layers", num_layers),
                                   ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                                   ("intermediate_size", intermediate_size),
                                   ("vocab_size", vocab_size)) if v is not None}
        _write_json(tmp / "config.json", _config(vocab, eos_id, dims))
        mx.save_safetensors(str(tmp / "model.safetensors"),
                            _weights(vocab, _silenced(tok), seed, dims),
                            metadata={"format": "mlx"})
        if _is_complete(target):  # someone else finished first
            return target
        if target.exists():
            shutil.rmtree(target)  # an incomplete leftover
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_supervisor.worker.demo.lm",
                                 description="Build the tiny demo llama into DIR.")
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build(args.dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
