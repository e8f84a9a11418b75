"""The benchmarks' lean SSE load generator.

It speaks raw HTTP/1.1 over asyncio streams (``Connection: close``, read to EOF) and only counts
``data: `` lines while a stream runs; the one JSON it decodes per request is the usage event at
the end. That keeps the client far cheaper than the servers it measures, which matters on a
2-core machine where client, gateway and worker share the CPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import PROMPT


@dataclass
class StreamResult:
    status: int = 0
    t_sent: float = 0.0
    t_first: float = 0.0  # first SSE event
    t_end: float = 0.0  # last byte
    events: int = 0
    completion_tokens: int = 0
    error: str = ""
    body: bytes = field(default=b"", repr=False)

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_sent

    def decode_tps(self) -> float:
        """Tokens/s between the first and the last event. A short answer that arrived in one read
        (a loaded client) has no such span; its rate is then over the whole request."""
        if self.completion_tokens < 2:
            return 0.0
        span = self.t_end - self.t_first
        if span > 0:
            return (self.completion_tokens - 1) / span
        whole = self.t_end - self.t_sent
        return self.completion_tokens / whole if whole > 0 else 0.0


def _usage_tokens(body: bytes) -> int:
    for chunk in reversed(body.split(b"data: ")[-4:]):
        if b'"usage"' in chunk:
            with contextlib.suppress(ValueError):
                usage = json.loads(chunk.split(b"\n\n", 1)[0]).get("usage") or {}
                return int(usage.get("completion_tokens") or 0)
    return 0


async def request(port: int, path: str, body: dict[str, Any], keep_body: bool = False) -> StreamResult:
    """One POST; for ``stream: true`` counts SSE events as they arrive. Reads to EOF."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    res = StreamResult()
    res.t_sent = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(head + payload)
        parts: list[bytes] = []
        tail = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            now = time.perf_counter()
            window = tail + data
            n = window.count(b"data: ")
            if n:
                if not res.events:
                    res.t_first = now
                res.events += n
            tail = data[-5:]
            res.t_end = now
            parts.append(data)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    raw = b"".join(parts)
    head_end = raw.find(b"\r\n\r\n")
    with contextlib.suppress(ValueError, IndexError):
        res.status = int(raw[9:12])
    payload_out = raw[head_end + 4:]
    if res.status != 200:
        res.error = payload_out[:500].decode(errors="replace")
    if body.get("stream"):
        res.completion_tokens = _usage_tokens(payload_out)
    else:
        res.t_first = res.t_first or res.t_end
        with contextlib.suppress(ValueError):
            text = payload_out
            if b"transfer-encoding: chunked" in raw[:head_end].lower():
                text = _dechunk(payload_out)
            res.completion_tokens = int((json.loads(text).get("usage") or {}).get("completion_tokens") or 0)
    if keep_body:
        res.body = payload_out
    return res


def _dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        n = int(data[i:j].split(b";")[0], 16)
        if n == 0:
            break
        out.append(data[j + 2:j + 2 + n])
        i = j + 2 + n + 2
    return b"".join(out)


def completion_body(model: str, max_tokens: int, prompt: str = PROMPT, stream: bool = True) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                         "temperature": 0.0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


STAGGER = 0.003  # seconds between the first connections of two lanes


async def concurrent(port: int, bodies: list[list[dict[str, Any]]], path: str = "/v1/completions"
                     ) -> tuple[float, list[StreamResult]]:
    """One task per list in ``bodies``, each sending its requests one after another; returns the
    wall time from the first send to the last byte, and every result.

    Lanes start ``STAGGER`` apart: mlx_lm.server (``http.server``) listens with a backlog of 5, and
    64 simultaneous connects overflow it, so SYN retries (1 s, 3 s, ...) rather than batching
    would decide its number. The same ramp applies to every server measured."""

    async def lane(i: int, items: list[dict[str, Any]]) -> list[StreamResult]:
        await asyncio.sleep(i * STAGGER)
        return [await request(port, path, b) for b in items]

    t0 = time.perf_counter()
    lanes = await asyncio.gather(*(lane(i, b) for i, b in enumerate(bodies)))
    wall = time.perf_counter() - t0
    results = [r for lane_results in lanes for r in lane_results]
    bad = [r for r in results if r.status != 200 or (r.completion_tokens <= 0)]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(results)} requests failed; first: "
                           f"status={bad[0].status} {bad[0].error!r}")
    return wall, results
