"""Graceful shutdown on SIGTERM: in-flight streams finish within shutdown_grace or are cut with
an error event (never silently), new requests get 503, and no worker outlives the gateway."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import StreamResult, alive, chat_body, fake, stream_request, wait_for

MODELS = {"m": {**fake(FAKE_TOKEN_DELAY=0.05), "max_concurrency": 8}, "idle": fake()}


def _setter(event: asyncio.Event) -> Callable[[StreamResult], None]:
    return lambda _result: event.set()


async def _sigterm_with_streams(srv: ServerProcess, n: int, max_tokens: int
                                ) -> tuple[list[StreamResult], httpx.Response, list[int], float]:
    """Start ``n`` streams, SIGTERM the gateway once each has a token, and ask for more work
    while it drains. Returns the streams, that late answer, the worker pids and the time the
    gateway took to exit."""
    assert srv.proc is not None
    url = srv.url + "/v1/chat/completions"
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 5)) as c:
        for m in MODELS:
            assert (await c.post(url, json=chat_body(m, max_tokens=1))).status_code == 200
        pids = srv.worker_pids()
        seen = [asyncio.Event() for _ in range(n)]
        streams = [asyncio.create_task(stream_request(c, url, chat_body("m", max_tokens=max_tokens),
                                                      on_event=_setter(e))) for e in seen]
        await asyncio.wait_for(asyncio.gather(*[e.wait() for e in seen]), 30)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        def draining() -> bool:
            return httpx.get(srv.url + "/health/ready", timeout=5).status_code == 503

        await asyncio.to_thread(wait_for, draining, 10)
        late = await c.post(url, json=chat_body("idle"))
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        rc = await asyncio.to_thread(srv.proc.wait, 60)
        assert rc == 0, srv.log()[-3000:]
        assert "Traceback" not in srv.log(), srv.log()[-3000:]
        return results, late, pids, time.monotonic() - t0


def test_sigterm_lets_streams_finish_within_grace() -> None:
    with ServerProcess(MODELS, {"shutdown_grace": 20.0}) as srv:
        results, late, pids, took = asyncio.run(_sigterm_with_streams(srv, 4, 60))
        for r in results:
            assert r.complete and r.finish_reason == "length", r
            assert r.text.split()[-1] == "tok59"
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert took < 20
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5, what="workers gone")
    assert srv.orphans == []


def test_short_grace_cuts_long_streams_with_an_error_event() -> None:
    grace = 1.0
    with ServerProcess(MODELS, {"shutdown_grace": grace}) as srv:
        results, late, pids, took = asyncio.run(_sigterm_with_streams(srv, 3, 5000))
        for r in results:
            assert r.status == 200 and r.events and not r.done, r.events[-2:]
            assert r.error is not None and r.error["code"] == "shutting_down", r.events[-2:]
            assert "shut down" in r.error["message"]
        assert late.status_code == 503
        assert grace <= took < grace + 15, took
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5, what="workers gone")
    assert srv.orphans == []
