"""The demo llama with a tokenizer that speaks real tool-call and thinking markup.

Same weights recipe and BPE as :mod:`.lm`, plus ``<tool_call>``, ``</tool_call>``, ``<think>``
and ``</think>`` as added tokens and a Qwen-2.5-style chat template: tools listed in the
system turn, an assistant's calls rendered as ``<tool_call>{"name": ..., "arguments": ...}
</tool_call>``, tool results as ``<tool_response>`` in a user turn. ``mlx_lm.load`` then infers
the ``json_tools`` parser (the template has ``<tool_call>`` and ``tool_call.name``) and
``has_thinking`` (both think markers are in the vocabulary), as it does for a real Qwen.

Two flavours of thinking:
- ``think_in_prompt=False`` (Qwen3 style): the generation prompt leaves thinking to the model;
  ``enable_thinking=False`` closes an empty think block in the prompt;
- ``think_in_prompt=True`` (DeepSeek-R1 style): the generation prompt opens ``<think>``, so the
  answer starts in thinking, unless ``enable_thinking=False`` closes it.

Usage: ``python -m mlx_supervisor.worker.demo.tools DIR [--seed N] [--think-in-prompt]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_supervisor.worker.demo import lm

MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>")

_SYSTEM = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
)

_TURNS = (
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}"
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
)


def chat_template(think_in_prompt: bool) -> str:
    opened = "'<think>\\n'" if think_in_prompt else "''"
    gen = (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}"
        f"{{%- else %}}{{{{- {opened} }}}}{{%- endif %}}"
        "{%- endif %}"
    )
    return _SYSTEM + _TURNS + gen


def build(dir: str | Path, seed: int = 0, *, think_in_prompt: bool = False) -> Path:
    """Write the tool-calling demo model into ``dir`` (see :func:`lm.build`) and return it."""
    return lm.build(dir, seed=seed, added_tokens=MARKUP,
                    chat_template=chat_template(think_in_prompt))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlx_supervisor.worker.demo.tools",
                                 description="Build the tool-calling demo llama into DIR.")
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--think-in-prompt", action="store_true")
    args = ap.parse_args(argv)
    print(build(args.dir, seed=args.seed, think_in_prompt=args.think_in_prompt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
