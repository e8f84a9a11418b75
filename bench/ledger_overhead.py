"""``python -m bench.ledger_overhead [--quick]``: what the request ledger costs a request.

The same streamed load (fake workers, so the gateway is what is measured) runs against a gateway
with the ledger on and one with it off, alternating the order each round so drift on a shared
machine hits both. Reported: p50/p99 end-to-end latency per mode, the pooled p99 ratio on/off
and the median of the per-round ratios. ``--control`` runs both arms without the ledger (A/A):
the ratio it prints is the noise floor to read the real one against. The last stdout line is the
result as JSON; it is also written to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mlx_supervisor.gateway.testing.server import ServerProcess

MODELS = {"f": {"path": "/nonexistent/fake", "kind": "fake", "max_concurrency": 64, "max_queue": 512,
                "env": {"FAKE_TOKEN_DELAY": "0.001"}}}
BODY = {"model": "f", "prompt": "one two three four", "max_tokens": 8, "stream": True,
        "stream_options": {"include_usage": True}}


async def one(port: int) -> tuple[float, float]:
    """(ttft, total) of one streamed completion over raw HTTP/1.1: the client stays cheap."""
    payload = json.dumps(BODY).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    first = 0.0
    chunks = []
    try:
        writer.write(head + payload)
        while data := await reader.read(1 << 16):
            if not first and b"data: " in data:
                first = time.perf_counter()
            chunks.append(data)
    finally:
        writer.close()
    end = time.perf_counter()
    raw = b"".join(chunks)
    if not raw.startswith(b"HTTP/1.1 200") or b"[DONE]" not in raw:
        raise RuntimeError(f"request failed: {raw[:300]!r}")
    return first - t0, end - t0


async def load(port: int, n: int, concurrency: int) -> list[tuple[float, float]]:
    left = iter(range(n))
    out: list[tuple[float, float]] = []

    async def lane() -> None:
        for _ in left:
            out.append(await one(port))

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return out


def run_mode(enabled: bool, n: int, concurrency: int, workdir: Path) -> list[tuple[float, float]]:
    db = workdir / f"ledger-{time.monotonic_ns()}.sqlite3"
    settings = {"warm_spare": False, "ledger": {"enabled": enabled, "path": str(db)}}
    with ServerProcess(MODELS, settings, workdir=Path(tempfile.mkdtemp(dir=workdir))) as srv:
        asyncio.run(load(srv.port, 30, 8))  # spawn the worker, warm both sides
        results = asyncio.run(load(srv.port, n, concurrency))
    if enabled:  # the ledger kept up: every request has its row
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT count(*) FROM jobs WHERE status = 'completed'").fetchone()[0]
        if rows != n + 30:
            raise RuntimeError(f"ledger has {rows} completed rows, expected {n + 30}")
    return results


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(results: list[tuple[float, float]]) -> dict[str, float]:
    total = [t for _, t in results]
    ttft = [f for f, _ in results]
    return {"requests": len(results), "p50_ms": round(pct(total, 0.5) * 1e3, 3),
            "p99_ms": round(pct(total, 0.99) * 1e3, 3), "mean_ms": round(statistics.fmean(total) * 1e3, 3),
            "ttft_p99_ms": round(pct(ttft, 0.99) * 1e3, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    ap.add_argument("--requests", type=int, help="requests per mode per round (default 500; quick 200)")
    ap.add_argument("--concurrency", type=int, default=8, help="streams at once (default 8)")
    ap.add_argument("--rounds", type=int, help="on/off pairs (default 5; quick 1)")
    ap.add_argument("--control", action="store_true", help="A/A: the ledger off in both arms")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "ledger_overhead.json")
    args = ap.parse_args()
    n = args.requests or (200 if args.quick else 500)
    rounds = args.rounds or (1 if args.quick else 5)
    pooled: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    per_round = []
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        for r in range(rounds):
            got = {}
            for enabled in ((True, False) if r % 2 == 0 else (False, True)):
                got[enabled] = run_mode(enabled and not args.control, n, args.concurrency, Path(tmp))
                pooled[enabled] += got[enabled]
            ratio = pct([t for _, t in got[True]], 0.99) / pct([t for _, t in got[False]], 0.99)
            per_round.append(round(ratio, 3))
            print(f"round {r + 1}: p99 on/off = {ratio:.3f}", flush=True)
    on, off = summary(pooled[True]), summary(pooled[False])
    result: dict[str, Any] = {
        "ledger_on": on, "ledger_off": off, "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 3),
        "p50_ratio": round(on["p50_ms"] / off["p50_ms"], 3), "p99_ratio_per_round": per_round,
        "p99_ratio_median_of_rounds": round(statistics.median(per_round), 3), "control": args.control,
        "concurrency": args.concurrency, "requests_per_mode": n * rounds, "tokens_per_request": BODY["max_tokens"],
    }
    for name, s in (("ledger on ", on), ("ledger off", off)):
        print(f"{name}: p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  mean {s['mean_ms']:.2f} ms  "
              f"({s['requests']} requests)")
    print(f"p99 ratio on/off: {result['p99_ratio']:.3f} pooled, "
          f"{result['p99_ratio_median_of_rounds']:.3f} median of rounds {per_round}"
          + (" (control: ledger off in both arms)" if args.control else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
