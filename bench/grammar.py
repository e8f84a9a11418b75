"""Constrained decoding's cost: decode tokens/s with a ``json_schema`` grammar ÷ the same chat
request without one, both through the same gateway in the same run.

Equal work on both sides: the schema holds one free string whose ``minLength`` is
``MIN_CHARS_PER_TOKEN`` × ``max_tokens`` characters, so the JSON cannot close before
``max_tokens`` (a greedy random-weight model otherwise closes it early now and then, and a
16-stream round then decodes fewer tokens in a shrinking batch). Every request's
``completion_tokens`` is checked: a figure passes only if each request on both sides decoded
exactly ``max_tokens``. Single stream: 16 ABBA pairs of one greedy SSE stream each (per-token
rate between the first and last token); each figure also gives the median of the pairs' own
ratios and their spread (``paired``). 16 streams: as many ABBA rounds of 16 concurrent streams
(aggregate tokens / wall time; a round varies 1.3-2x on the shared CPU box, so not fewer). Each side warms up first (the first grammar request also builds
llguidance's tokenizer). For context, the same 16-stream pairing with mlx-lm's own
``repetition_penalty`` processor instead of the grammar: any logits processor moves
``BatchGenerator`` onto its per-row path.
"""

from __future__ import annotations

import asyncio
import os
import statistics
from typing import Any

from bench.common import (
    Settings,
    figure,
    gateway,
    median,
    model_dir,
    ratio,
    started,
)
from bench.grammar_auto import auto_figures
from bench.load import concurrent, request

MIN_CHARS_PER_TOKEN = 16  # the bench model writes ~2.5 characters per token inside the string


def schema(max_tokens: int, bounded: bool = True) -> dict[str, Any]:
    """One free string too long to close within ``max_tokens`` (``bounded``), or with no
    minLength at all (llguidance's mask is cheaper there: its lexer state repeats)."""
    story: dict[str, Any] = {"type": "string"}
    if bounded:
        story["minLength"] = MIN_CHARS_PER_TOKEN * max_tokens
    return {"type": "object", "properties": {"story": story}, "required": ["story"],
            "additionalProperties": False}


CHAT = "/v1/chat/completions"


def _body(max_tokens: int, prompt: str, constrained: bool | str) -> dict[str, Any]:
    """``constrained``: True for the grammar; "free" for the grammar without minLength;
    "penalty" for mlx-lm's own repetition-penalty logits processor instead (the cost of any
    processor in ``BatchGenerator``)."""
    body: dict[str, Any] = {"model": "m", "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": prompt}]}
    if constrained == "penalty":
        body["repetition_penalty"] = 1.01
    elif constrained:
        sch = schema(max_tokens, bounded=constrained != "free")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": sch}}
    return body


class Decoded:
    """Every request's ``completion_tokens``, per side (True: the grammar or the penalty)."""

    def __init__(self) -> None:
        self.counts: dict[bool, list[int]] = {True: [], False: []}

    def add(self, constrained: bool | str, tokens: list[int]) -> None:
        self.counts[bool(constrained)] += tokens

    def equal(self, max_tokens: int) -> bool:
        return all(n == max_tokens for side in self.counts.values() for n in side)

    def summary(self) -> dict[str, list[int]]:
        return {("with" if k else "without"): [min(v), max(v)] for k, v in self.counts.items() if v}


def _single(port: int, max_tokens: int, tag: str, constrained: bool | str, seen: Decoded
            ) -> float:
    r = asyncio.run(request(port, CHAT, _body(max_tokens, f"Tell a story {tag}", constrained)))
    if r.status != 200:
        raise RuntimeError(f"grammar bench request failed: {r.status} {r.error}")
    seen.add(constrained, [r.completion_tokens])
    return r.decode_tps()


def _many(port: int, n: int, max_tokens: int, tag: str, constrained: bool | str,
          seen: Decoded) -> float:
    bodies = [[_body(max_tokens, f"Story {i} {tag}", constrained)] for i in range(n)]
    wall, results = asyncio.run(concurrent(port, bodies, path=CHAT))
    bad = [r for r in results if r.status != 200]
    if bad:
        raise RuntimeError(f"grammar bench request failed: {bad[0].status} {bad[0].error}")
    seen.add(constrained, [r.completion_tokens for r in results])
    return sum(r.completion_tokens for r in results) / wall


def _paired(reps: int, run: Any, arm: bool | str = True) -> tuple[list[float], list[float]]:
    """``run(tag, arm)`` and ``run(tag, False)`` in ABBA order after one warm-up pair:
    (with, without) rates."""
    on: list[float] = []
    off: list[float] = []
    for i in range(reps + 1):
        for side in ((arm, False) if i % 2 else (False, arm)):
            rate = run(f"r{i}", side)
            if i:
                (on if side else off).append(rate)
    return on, off


def spread(on: list[float], off: list[float]) -> dict[str, Any]:
    """Each ABBA pair's own ratio (its two runs are adjacent, so the box's drift cancels
    within a pair): the median and the spread (min, quartiles, max)."""
    r = sorted(a / b for a, b in zip(on, off, strict=True) if b)
    if not r:
        return {}
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return {"median": round(median(r), 4), "min": round(r[0], 3), "q1": round(q[0], 3),
            "q3": round(q[2], 3), "max": round(r[-1], 3), "n": len(r)}


def grammar(s: Settings) -> dict[str, Any]:
    from bench.suites import _lm_models, _wait_ready

    path = model_dir(s)
    max_tokens = s.pick(96, 192, 12)
    reps, streams = s.pick(4, 8, 1), 16
    single = s.pick(8, 16, 1)  # single-stream pairs vary most (1-3 ms a token here), and cost least
    one_seen, many_seen, pen_seen, free_seen = Decoded(), Decoded(), Decoded(), Decoded()
    load = [os.getloadavg()]  # the shared box's load moves every figure here: kept with them
    with started(gateway(_lm_models(path))) as srv:
        _wait_ready(srv.url)
        one_on, one_off = _paired(
            single, lambda tag, c: _single(srv.port, max_tokens, tag, c, one_seen))
        free_on, free_off = _paired(
            single, lambda tag, c: _single(srv.port, max_tokens, tag, c, free_seen), arm="free")
        many_on, many_off = _paired(
            reps, lambda tag, c: _many(srv.port, streams, max_tokens, tag, c, many_seen))
        pen_on, pen_off = _paired(
            max(2, reps // 2), lambda tag, c: _many(srv.port, streams, max_tokens, tag, c, pen_seen),
            arm="penalty")
    load.append(os.getloadavg())
    figs = []
    for name, on, off, seen in (("single stream", one_on, one_off, one_seen),
                                (f"{streams} streams (aggregate)", many_on, many_off, many_seen)):
        r = ratio(median(on), median(off))
        figs.append(figure(f"json_schema grammar vs none, {name}", median(on), median(off),
                           "tokens/s", "higher", "the same chat request without a grammar",
                           target=">= 0.9", passed=r >= 0.9 and seen.equal(max_tokens),
                           decoded_tokens=seen.summary(), paired=spread(on, off)))
    figs.append(figure(f"context: repetition_penalty (mlx-lm's own processor) vs none, {streams} "
                       "streams", median(pen_on), median(pen_off), "tokens/s", "higher",
                       "the same chat request without a processor", decoded_tokens=pen_seen.summary()))
    figs.append(figure("context: json_schema without minLength (may close early; per-token rate) "
                       "vs none, single stream", median(free_on), median(free_off), "tokens/s",
                       "higher", "the same chat request without a grammar",
                       decoded_tokens=free_seen.summary(), paired=spread(free_on, free_off)))
    figs += auto_figures(s)  # tool_choice auto before any call: bench/grammar_auto
    return {"figures": figs, "details": {
        "penalty_with": [round(x, 1) for x in pen_on],
        "penalty_without": [round(x, 1) for x in pen_off],
        "max_tokens": max_tokens, "pairs": reps, "single_pairs": single,
        "load_average": {"start": [round(x, 2) for x in load[0]],
                         "end": [round(x, 2) for x in load[1]]},
        "single_with": [round(x, 1) for x in one_on], "single_without": [round(x, 1) for x in one_off],
        "many_with": [round(x, 1) for x in many_on], "many_without": [round(x, 1) for x in many_off],
        "schema": schema(max_tokens)}}
