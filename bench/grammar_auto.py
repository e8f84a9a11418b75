"""``tool_choice`` auto costs nothing until the model opens a call (the lazy grammar): decode
tokens/s of a chat request with ``tools`` (auto) ÷ the same request without them, side by side
in one run, on the tool-markup demo model (random weights, Qwen-style ``<tool_call>``).

Both sides carry the same ``logit_bias``: ``<tool_call>`` and EOS at -100, so the model never
opens a call (no trigger: this measures the untriggered path) and both sides decode exactly
``max_tokens`` (checked). The template lists the tools in the prompt, so the side without them
pads its user message to the same prompt length (checked with ``usage.prompt_tokens``): on a
model this small the attention over a longer context is itself a measurable cost. Single
stream: the per-token rate between the first and last token, in ABBA pairs; 16 streams: the
aggregate (tokens / wall time) of ABBA rounds of 16 concurrent streams.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from bench.common import PY, ROOT, Settings, figure, gateway, median, ratio, started
from bench.load import concurrent, request

CHAT = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def tools_model(s: Settings) -> Path:
    """The demo tool model (built once under ``models_dir``)."""
    d = s.models_dir / "tools-0"
    if not (d / "tokenizer.json").exists():
        subprocess.run([PY, "-m", "mlx_supervisor.worker.demo.tools", str(d)], check=True,
                       cwd=ROOT, capture_output=True)
    return d


def _bias(d: Path) -> dict[str, int]:
    vocab = json.loads((d / "tokenizer.json").read_text())
    start = next(t["id"] for t in vocab["added_tokens"] if t["content"] == "<tool_call>")
    eos = json.loads((d / "config.json").read_text()).get("eos_token_id", [])
    return {str(t): -100 for t in [start, *(eos if isinstance(eos, list) else [eos])]}


def _body(max_tokens: int, prompt: str, tools: bool, bias: dict[str, int],
          pad: int = 0) -> dict[str, Any]:
    content = prompt if tools else prompt + " x" * pad
    body: dict[str, Any] = {"model": "m", "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True},
                            "logit_bias": bias, "messages": [{"role": "user", "content": content}]}
    if tools:
        body |= {"tools": TOOLS, "tool_choice": "auto"}
    return body


def _pad(url: str, bias: dict[str, int]) -> int:
    """Filler tokens that make the side without tools as long a prompt as the side with."""
    import httpx

    def prompt_tokens(tools: bool, pad: int) -> int:
        body = _body(1, "Story 0 r0", tools, bias, pad) | {"stream": False}
        r = httpx.post(url + CHAT, json=body, timeout=60)
        r.raise_for_status()
        return int(r.json()["usage"]["prompt_tokens"])

    target, pad = prompt_tokens(True, 0), 0
    for _ in range(4):  # " x" is one token here; a tokenizer may merge some: converge
        pad += target - prompt_tokens(False, pad)
    if prompt_tokens(False, pad) != target:
        raise RuntimeError("auto bench: could not pad the prompt to the tools' length")
    return pad


def _rates(port: int, n: int, bodies: list[dict[str, Any]], max_tokens: int) -> float:
    if n == 1:
        wall, results = 0.0, [asyncio.run(request(port, CHAT, bodies[0]))]
    else:
        wall, results = asyncio.run(concurrent(port, [[b] for b in bodies], path=CHAT))
    bad = [r for r in results if r.status != 200 or r.completion_tokens != max_tokens]
    if bad:
        raise RuntimeError(f"auto bench: {bad[0].status} {bad[0].error} "
                           f"({bad[0].completion_tokens} of {max_tokens} tokens)")
    return results[0].decode_tps() if n == 1 else n * max_tokens / wall


def auto_figures(s: Settings) -> list[dict[str, Any]]:
    """The two figures, paired as :mod:`bench.grammar` pairs its own."""
    from bench.grammar import _paired, spread
    from bench.suites import _lm_models, _wait_ready

    d = tools_model(s)
    bias, max_tokens = _bias(d), s.pick(96, 192, 12)
    figs = []
    with started(gateway(_lm_models(d))) as srv:
        _wait_ready(srv.url)
        pad = _pad(srv.url, bias)
        for n, reps in ((1, s.pick(8, 16, 1)), (16, s.pick(4, 8, 1))):
            on, off = _paired(reps, lambda tag, tools, n=n: _rates(
                srv.port, n, [_body(max_tokens, f"Story {i} {tag}", bool(tools), bias, pad)
                              for i in range(n)], max_tokens))
            name = "single stream" if n == 1 else f"{n} streams (aggregate)"
            r = ratio(median(on), median(off))
            figs.append(figure(f"tools with tool_choice auto, no call opened, vs no tools, {name}",
                               median(on), median(off), "tokens/s", "higher",
                               "the same chat request without tools (same logit_bias, "
                               "prompt padded to the same length)",
                               target=">= 0.95", passed=r >= 0.95, paired=spread(on, off),
                               with_=[round(x, 1) for x in on], without=[round(x, 1) for x in off]))
    return figs
