"""Build a tiny, real Qwen2-VL model (random weights) that ``mlx_vlm.load`` serves like a download.

Nothing can be downloaded on test machines, so tests (and demos) build this into a directory:
a 2-layer, 64-wide ``qwen2_vl`` text model with mRoPE, a 2-block vision tower, a byte-level
BPE tokenizer carrying Qwen's special tokens and a chat template that emits the image tokens,
and transformers' ``Qwen2VLImageProcessor`` with a small pixel budget so images stay cheap.
The output is gibberish, but every code path (image processing, vision tower, mRoPE
positions, streaming detokenization) is the real one.

Run ``python -m mlx_supervisor.worker.demo.vlm DIR`` to build one by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
"""Trained first, so their ids are their indices here (the config refers to them by id)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ['image', 'image_url', 'input_image'] %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture shows a red square on a white background.",
    "Describe this image in one short sentence, please.",
    "What colour is the shape? It is red, green or blue.",
    "Hello! How can I help you today? I see a cat, a dog and a tree.",
    "user assistant system: you are a helpful assistant that looks at images.",
] * 20

VOCAB_SIZE = 512
TEXT_HIDDEN = 64


def _config(vocab_size: int) -> dict:
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        # head_dim 16 -> 8 rotary pairs split over (temporal, height, width)
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": TEXT_HIDDEN,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
    }


def _save_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return int(tok.get_vocab_size())


def _save_image_processor(out: Path) -> None:
    from transformers import Qwen2VLImageProcessor

    # 28x28 pixels per merged token: 4..16 merged tokens per image keeps prefill tiny.
    proc = Qwen2VLImageProcessor(
        min_pixels=4 * 28 * 28,
        max_pixels=16 * 28 * 28,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc.save_pretrained(str(out))


def _save_weights(out: Path, config: dict, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_vl

    mx.random.seed(seed)
    cfg = qwen2_vl.ModelConfig.from_dict(dict(config))
    cfg.text_config = qwen2_vl.TextConfig.from_dict(cfg.text_config)
    cfg.vision_config = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    model = qwen2_vl.Model(cfg)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def build(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny model into ``directory`` (created if missing) and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = _save_tokenizer(out)
    _save_image_processor(out)
    config = _config(vocab_size)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_weights(out, config, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.dir, args.seed))


if __name__ == "__main__":
    main()
