"""The attacks of the chaos run that already held, kept as bounded tests so they keep holding:
a worker stopped with SIGSTOP, a storm of SIGHUPs (one removing a model while it loads), and
200 streaming clients that disconnect mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess, write_config

from ._kit import chat_body, fake, hot, wait_for


def test_a_sigstopped_worker_is_found_within_heartbeat_timeout_and_replaced() -> None:
    hb = 1.5
    with ServerProcess({"m": fake()}, {"heartbeat_interval": 0.2, "heartbeat_timeout": hb}) as srv:
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat_body("m"), timeout=30).status_code == 200
        pid = int(hot(srv)["m"]["pid"])
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            wait_for(lambda: hot(srv).get("m", {}).get("pid") != pid, hb + 10, what="replaced or gone")
        finally:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - t0 < hb + 10
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("m"), timeout=30)
        assert r.status_code == 200 and hot(srv)["m"]["pid"] != pid
    assert srv.orphans == []


def test_a_storm_of_sighups_breaks_nothing() -> None:
    """21 SIGHUPs in about 2 s, alternating configs with and without a model that is loading
    (a 2 s load): the gateway keeps serving, the model that never changed keeps its worker, and
    the config last written is the one in force."""
    models = {"keep": fake(), "flip": fake(FAKE_LOAD_SECONDS=2.0)}
    with ServerProcess(models) as srv:
        assert srv.proc is not None
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat_body("keep"), timeout=30).status_code == 200
        keep_pid = hot(srv)["keep"]["pid"]
        base = {"host": "127.0.0.1", "port": srv.port, "run_dir": str(srv.workdir / "run"),
                "heartbeat_interval": 0.5, "heartbeat_timeout": 5.0, "stop_grace": 3.0,
                "shutdown_grace": 5.0, "warm_spare": False}
        loader = threading.Thread(target=_load_quietly, args=(srv.url + "/admin/models/flip/load",),
                                  daemon=True)
        loader.start()
        wait_for(lambda: hot(srv).get("flip", {}).get("state") in ("starting", "loading"), 10,
                 what="flip loading when the storm starts")
        for i in range(21):
            write_config(srv.config, base, models if i % 2 else {"keep": models["keep"]})
            os.kill(srv.proc.pid, signal.SIGHUP)
            time.sleep(0.1)
        # The last config (i = 20) has no "flip": it is gone; "keep" is untouched.
        wait_for(lambda: httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
                 and [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]] == ["keep"],
                 20, what="the last config in force")
        loader.join(30)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("keep"), timeout=30)
        assert r.status_code == 200 and hot(srv)["keep"]["pid"] == keep_pid
        wait_for(lambda: "flip" not in hot(srv), 20, what="the removed model's worker gone")
        assert "Traceback" not in srv.log()
    assert srv.orphans == []


def _load_quietly(url: str) -> None:
    """Load "flip" (2 s); the storm removes it meanwhile, so any answer will do."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, timeout=30)


async def _disconnect_mid_stream(c: httpx.AsyncClient, url: str, i: int) -> bool:
    async with c.stream("POST", url, json=chat_body("m", f"client {i}", max_tokens=5000, stream=True)) as r:
        if r.status_code != 200:
            return False
        n = 0
        async for line in r.aiter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                return True  # leaving the block closes the connection mid-stream
    return False


def test_200_mid_stream_disconnects_leak_nothing() -> None:
    model = {**fake(FAKE_TOKEN_DELAY=0.01), "max_concurrency": 64, "max_queue": 256}
    with ServerProcess({"m": model}, {"queue_timeout": 60.0}) as srv:
        assert srv.proc is not None
        proc = psutil.Process(srv.proc.pid)
        url = srv.url + "/v1/chat/completions"

        async def wave(n: int) -> int:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as c:
                got = await asyncio.wait_for(asyncio.gather(
                    *[_disconnect_mid_stream(c, url, i) for i in range(n)]), 120)
            return sum(got)

        assert asyncio.run(wave(50)) == 50  # warm-up: every code path once
        wait_for(lambda: hot(srv)["m"]["inflight"] == 0, 20)
        gc.collect()
        rss0 = proc.memory_info().rss
        assert asyncio.run(wave(200)) == 200
        wait_for(lambda: hot(srv)["m"]["inflight"] == 0 and hot(srv)["m"]["queued"] == 0, 20)
        wait_for(lambda: hot(srv)["m"]["worker_inflight"] == 0, 20, what="the worker cancelled them all")
        grown = (proc.memory_info().rss - rss0) / 2**20
        assert grown < 20, f"gateway RSS grew by {grown:.1f} MiB"
        assert "Traceback" not in srv.log()
    assert srv.orphans == []
