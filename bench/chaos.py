"""``python -m bench.chaos [--quick] [--out FILE]``: two figures of the gateway under attack.

- **Slow readers** (with ``max_concurrency`` 64, then the default 8): 50 streaming clients that never read a byte (each asks for half a million
  tokens; one that is cut off at ``write_timeout`` is replaced at once, so 50 are always there)
  for 60 s, against one fake model. Reported: the gateway's RSS growth (peak during the attack
  minus before), and a reading client's latency on the same model (one 50-token answer at a
  time) under the attack ÷ the same client's latency unloaded, measured in the same run.
- **Fairness under thrash**: three 300 MB fake models under a 700 MB budget (two fit), four
  client loops per model (equal demand, never idle) for 60 s. Reported: each model's share of
  the answers, and the smallest share ÷ the equal share (1/3).

Fake workers, so what is measured is the gateway. ``--quick`` runs 20 s each; ``--only slow8``
(or ``slow64``, ``fairness``) runs only those figures. The last stdout
line is the result as JSON; it is also written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess, fake_model

SLOW = {**fake_model(FAKE_TOKEN_DELAY=0.01, FAKE_CONTEXT_LENGTH=10**6), "max_queue": 128}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def _non_reader(port: int) -> socket.socket:
    body = json.dumps({**CHAT, "max_tokens": 500_000, "stream": True}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    s.setblocking(False)
    return s


def _cut(url: str) -> int:
    """Requests the gateway has cut off for not reading (from the ledger)."""
    r = httpx.get(url + "/v1/jobs", params={"status": "cancelled", "limit": 1000}, timeout=10)
    return sum(1 for j in r.json()["data"] if (j.get("error") or {}).get("type") == "write_timeout")


def _latencies(url: str, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=120) as c:
        while time.monotonic() < end and len(out) < 10_000:
            t0 = time.perf_counter()
            r = c.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 50})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def slow_readers(seconds: float, max_concurrency: int, n: int = 50) -> dict[str, Any]:
    model = {**SLOW, "max_concurrency": max_concurrency}
    with ServerProcess({"m": model}, {"queue_timeout": 120.0}) as srv:
        assert srv.proc is not None
        proc = psutil.Process(srv.proc.pid)
        httpx.post(srv.url + "/admin/models/m/load", timeout=60).raise_for_status()
        unloaded = _latencies(srv.url, min(10.0, seconds / 3))
        rss0 = proc.memory_info().rss
        peak, stop, replaced = [rss0], threading.Event(), [0]
        socks = [_non_reader(srv.port) for _ in range(n)]

        def keep() -> None:  # 50 non-readers at every moment; sample the RSS meanwhile
            while not stop.wait(0.5):
                peak[0] = max(peak[0], proc.memory_info().rss)
                for _ in range(_cut(srv.url) - replaced[0]):
                    socks.append(_non_reader(srv.port))  # the cut one's socket stays, unread
                    replaced[0] += 1

        keeper = threading.Thread(target=keep, daemon=True)
        keeper.start()
        try:
            loaded = _latencies(srv.url, seconds)
        finally:
            stop.set()
            keeper.join(10)
            for s in socks:
                s.close()
    u, lo = statistics.median(unloaded), statistics.median(loaded)
    return {"non_readers": n, "max_concurrency": max_concurrency, "seconds": seconds, "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_peak_mb": round(peak[0] / 2**20, 1), "rss_growth_mb": round((peak[0] - rss0) / 2**20, 1),
            "cut_and_replaced": replaced[0], "write_timeout": 30.0, "reader_unloaded_s": round(u, 4),
            "reader_loaded_s": round(lo, 4), "reader_latency_ratio": round(lo / u, 3),
            "reader_requests": len(loaded)}


async def _client(c: httpx.AsyncClient, url: str, model: str, until: float, answers: Counter[str],
                  refused: Counter[str]) -> None:
    for _ in range(100_000):
        if time.monotonic() >= until:
            return
        r = await c.post(url, json={**CHAT, "model": model, "max_tokens": 3})
        if r.status_code == 200:
            answers[model] += 1
        else:
            refused[f"{r.status_code} {r.json()['error']['code']}"] += 1
            await asyncio.sleep(0.05)


def fairness(seconds: float, turn: float) -> dict[str, Any]:
    models = {m: {**fake_model(mem_mb=300, FAKE_TOKEN_DELAY=0.01), "max_concurrency": 4, "max_queue": 16}
              for m in "abc"}
    answers: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    with ServerProcess(models, {"memory_budget": "700MB", "turn_seconds": turn,
                                "queue_timeout": 60.0}) as srv:
        async def run() -> None:
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=20)) as c:
                until = time.monotonic() + seconds
                await asyncio.gather(*[_client(c, srv.url + "/v1/chat/completions", m, until,
                                               answers, refused) for m in models for _ in range(4)])

        asyncio.run(run())
    total = sum(answers.values()) or 1
    shares = {m: round(answers[m] / total, 3) for m in models}
    return {"seconds": seconds, "turn_seconds": turn, "answers": dict(answers),
            "shares": shares, "min_share_vs_equal": round(min(shares.values()) * 3, 3),
            "refused": dict(refused)}


FIGURES = {"slow64": "slow_readers", "slow8": "slow_readers_default_concurrency",
           "fairness": "fairness"}
RUN = {"slow64": lambda s, q: slow_readers(s, 64), "slow8": lambda s, q: slow_readers(s, 8),
       "fairness": lambda s, q: fairness(s, 2.0 if q else 10.0)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench/out/chaos.json")
    ap.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES),
                    help="run only these figures")
    args = ap.parse_args()
    seconds = 20.0 if args.quick else 60.0
    result = {FIGURES[f]: RUN[f](seconds, args.quick) for f in args.only}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
