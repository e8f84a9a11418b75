"""Overload: concurrency and queue limits (429 + Retry-After), queue_timeout (503), and load
tests where every request is either answered fully or refused cleanly, none hung or truncated,
with the gateway's memory back near where it started."""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from typing import Any

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import StreamResult, chat_body, fake, hot, stream_request, wait_for

SLOW = fake(FAKE_TOKEN_DELAY=0.05)


async def _poll(cond: Any, timeout: float = 20.0) -> Any:
    return await asyncio.to_thread(wait_for, cond, timeout)


async def _hold_stream(c: httpx.AsyncClient, url: str, model: str, started: asyncio.Event,
                       release: asyncio.Event) -> None:
    """A long stream that reads one event, then waits for ``release`` and disconnects."""
    async with c.stream("POST", url, json=chat_body(model, max_tokens=5000, stream=True)) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()  # keep a reference: a dropped generator is closed, and so the stream
        async for line in lines:
            if line.startswith("data: "):
                break
        started.set()
        await release.wait()  # leaving ``c.stream`` closes the connection


async def test_per_model_and_global_limits_429_then_queue_timeout_503() -> None:
    """Global defaults max_concurrency=1, max_queue=1 (model ``g``); model ``p`` overrides them
    with 2 and 3. Beyond in-flight + queued: 429 with Retry-After at once. A queued request that
    waits longer than queue_timeout: 503 with Retry-After. Queued requests run once slots free."""
    models = {"g": SLOW, "p": {**SLOW, "max_concurrency": 2, "max_queue": 3}}
    queue_timeout = 6.0
    settings = {"max_concurrency": 1, "max_queue": 1, "queue_timeout": queue_timeout}
    with ServerProcess(models, settings) as srv:
        url = srv.url + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as c:
            await asyncio.gather(*[c.post(url, json=chat_body(m, max_tokens=1)) for m in models])

            # p: 2 in flight, 3 queued, the 6th refused; the queued ones run when the slots free.
            release = asyncio.Event()
            started = [asyncio.Event() for _ in range(2)]
            holders = [asyncio.create_task(_hold_stream(c, url, "p", s, release)) for s in started]
            await asyncio.gather(*[s.wait() for s in started])
            queued = [asyncio.create_task(c.post(url, json=chat_body("p", max_tokens=2))) for _ in range(3)]
            await _poll(lambda: hot(srv)["p"]["queued"] == 3)
            refused = await c.post(url, json=chat_body("p"))
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            err = refused.json()["error"]
            assert err["code"] == "queue_full" and "max_queue" in err["message"]
            assert err["type"] == "rate_limit_error"
            release.set()
            await asyncio.gather(*holders)
            for r in await asyncio.gather(*queued):
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"

            # g (global limits): 1 in flight, 1 queued, the 3rd refused; the queued one times out.
            release, started_g = asyncio.Event(), asyncio.Event()
            holder = asyncio.create_task(_hold_stream(c, url, "g", started_g, release))
            await started_g.wait()
            t0 = time.monotonic()
            waiting = asyncio.create_task(c.post(url, json=chat_body("g")))
            await _poll(lambda: hot(srv)["g"]["queued"] == 1)
            refused = await c.post(url, json=chat_body("g"))
            assert refused.status_code == 429 and refused.headers["retry-after"]
            timed_out = await waiting
            assert timed_out.status_code == 503, timed_out.text
            assert timed_out.json()["error"]["code"] == "queue_timeout"
            assert "queue_timeout" in timed_out.json()["error"]["message"]
            assert int(timed_out.headers["retry-after"]) >= 1
            assert queue_timeout - 0.5 < time.monotonic() - t0 < 30
            release.set()
            await holder
            assert hot(srv)["g"]["queued"] == 0
            await _poll(lambda: hot(srv)["g"]["inflight"] == 0)
    assert srv.orphans == []


async def _round(srv: ServerProcess, model: str, n: int, max_tokens: int, timeout: float) -> list[StreamResult]:
    """``n`` concurrent streaming clients; each bounded by ``timeout`` (a hang fails the test)."""
    url = srv.url + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
        async def one(i: int) -> StreamResult:
            body = chat_body(model, f"client {i} says hello", max_tokens=max_tokens,
                             stream_options={"include_usage": True})
            return await asyncio.wait_for(stream_request(c, url, body), timeout)

        return await asyncio.gather(*[one(i) for i in range(n)])


def _check(results: list[StreamResult], max_tokens: int) -> Counter[str]:
    """Every request answered fully or refused with 429/503 and an error body; nothing else."""
    kinds: Counter[str] = Counter()
    for r in results:
        if r.complete:
            usage = r.events[-1].get("usage") or {}
            assert usage.get("completion_tokens") == max_tokens or r.finish_reason == "stop", r
            kinds["complete"] += 1
        elif r.refused:
            kinds[str(r.status)] += 1
        else:
            raise AssertionError(f"neither complete nor cleanly refused: status={r.status} "
                                 f"done={r.done} error={r.error} body={r.body} last={r.events[-1:]}")
    return kinds


def _rss(srv: ServerProcess) -> int:
    assert srv.proc is not None
    return int(psutil.Process(srv.proc.pid).memory_info().rss)


def test_200_concurrent_streams_against_a_fast_fake_worker() -> None:
    """max_concurrency 50 + max_queue 100 for 200 clients: at least 150 complete (a refusal only
    happens while 150 others are in the system, and those all finish), the rest get 429."""
    model = {**fake(FAKE_TOKEN_DELAY=0.001), "max_concurrency": 50, "max_queue": 100}
    with ServerProcess({"fast": model}, {"queue_timeout": 30.0}) as srv:
        t0 = time.monotonic()
        # Loaded first: while a model is cold nothing is in flight, so only max_queue would fit.
        httpx.post(srv.url + "/admin/models/fast/load", timeout=30).raise_for_status()
        warm = _check(asyncio.run(_round(srv, "fast", 200, 16, 45)), 16)
        gc.collect()
        rss0 = _rss(srv)
        kinds = _check(asyncio.run(_round(srv, "fast", 200, 16, 45)), 16)
        assert kinds["complete"] >= 150 and warm["complete"] >= 150, (warm, kinds)
        assert set(kinds) <= {"complete", "429"}, kinds
        wait_for(lambda: hot(srv)["fast"]["inflight"] == 0 and hot(srv)["fast"]["queued"] == 0)
        grown = _rss(srv) - rss0
        assert grown < 50 * 2**20, f"gateway RSS grew by {grown / 2**20:.1f} MiB"
        assert time.monotonic() - t0 < 60
        assert "Traceback" not in srv.log(), srv.log()[-3000:]
    assert srv.orphans == []


def test_50_concurrent_streams_against_the_real_tiny_model(real_srv: ServerProcess) -> None:
    """50 clients on the real tiny llama (8 in flight, the rest queued): all complete or are
    refused cleanly; the gateway's RSS is back near its start after a warm-up round."""
    srv = real_srv
    t0 = time.monotonic()
    _check(asyncio.run(_round(srv, "tiny", 50, 16, 55)), 16)
    rss0 = _rss(srv)
    kinds = _check(asyncio.run(_round(srv, "tiny", 50, 16, 55)), 16)
    assert kinds["complete"] >= 1 and set(kinds) <= {"complete", "429", "503"}, kinds
    wait_for(lambda: hot(srv)["tiny"]["inflight"] == 0)
    grown = _rss(srv) - rss0
    assert grown < 50 * 2**20, f"gateway RSS grew by {grown / 2**20:.1f} MiB"
    assert time.monotonic() - t0 < 60
