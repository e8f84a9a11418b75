"""Gateway CPU per streamed token on each surface: Anthropic Messages and OpenAI Responses
against chat completions (the baseline they adapt), one fake worker, same run.

The fake worker (no MLX) makes the gateway's own work most of what is measured; CPU seconds of
the gateway process, not wall time, so other load on a shared machine does not skew it.
``python -m bench.adapters [--tokens N] [--streams N]``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess, fake_model

MSG = [{"role": "user", "content": "go"}]
SURFACES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {"messages": MSG}),
    "messages": ("/v1/messages", {"messages": MSG}),
    "responses": ("/v1/responses", {"input": "go", "store": False}),
}


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def measure(url: str, gw: psutil.Process, surface: str, tokens: int, streams: int) -> float:
    """Gateway CPU microseconds per token over ``streams`` sequential streams."""
    path, extra = SURFACES[surface]
    cap = "max_output_tokens" if surface == "responses" else "max_tokens"
    body = {"model": "f", "stream": True, cap: tokens, **extra}
    c0, n = _cpu(gw), 0
    for _ in range(streams):
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            r.raise_for_status()
            for _line in r.iter_lines():
                pass
        n += tokens
    return (_cpu(gw) - c0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with ServerProcess({"f": fake_model()}, {"log_level": "WARNING", "ledger": {"enabled": False}}) as srv:
        assert srv.proc is not None
        gw = psutil.Process(srv.proc.pid)
        for s in SURFACES:  # warm every path once
            measure(srv.url, gw, s, 20, 1)
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: load drifts, code does not
            for s in SURFACES:
                us = measure(srv.url, gw, s, args.tokens, args.streams)
                best[s] = min(best.get(s, us), us)
    report: dict[str, float] = {f"{s}_gateway_cpu_us_per_token": v for s, v in best.items()}
    for s in ("messages", "responses"):
        report[f"{s}_over_chat"] = best[s] / best["chat"]
    print(json.dumps({k: round(v, 3) for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
