"""Gateway faults: kill -9 of the gateway leaves no workers behind, and a new gateway on the same
run directory starts with no manual clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import alive, chat_body, fake, hot, stream_request, wait_for

MODELS = {"ready": fake(), "streaming": fake(FAKE_TOKEN_DELAY=0.05),
          "loading": fake(FAKE_LOAD_SECONDS=60)}


def test_kill_9_gateway_leaves_no_orphans_and_restart_recovers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = ServerProcess(MODELS, workdir=tmp_path).start()
    try:
        assert httpx.post(first.url + "/v1/chat/completions", json=chat_body("ready"),
                          timeout=30).status_code == 200
        # One worker ready and idle, one mid-stream, one still loading when the gateway dies.
        httpx.post(first.url + "/admin/models/streaming/load", timeout=30).raise_for_status()

        async def start_stream() -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                await stream_request(c, first.url + "/v1/chat/completions",
                                     chat_body("streaming", max_tokens=10_000))

        def in_background() -> None:  # both calls end when the gateway dies under them
            with contextlib.suppress(httpx.HTTPError):
                asyncio.run(start_stream())

        def cold_load() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(first.url + "/admin/models/loading/load", timeout=90)

        t = threading.Thread(target=in_background, daemon=True)
        t.start()
        threading.Thread(target=cold_load, daemon=True).start()
        wait_for(lambda: hot(first).get("streaming", {}).get("inflight") == 1
                 and hot(first).get("loading", {}).get("state") == "loading", timeout=20)
        pids = first.worker_pids()
        assert len(pids) == 3 and all(alive(p) for p in pids)
        gw_pid = first.proc.pid if first.proc else 0
        socket = run_dir / f"gw-{gw_pid}.sock"
        assert socket.exists() and (run_dir / "gateway.pid").exists()

        first.proc.kill()
        first.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in pids), timeout=2.0, step=0.02,
                 what=f"workers {pids} gone within 2 s of the gateway's kill -9")
        assert time.monotonic() - t0 < 2.0
        t.join(10)
    finally:
        first.stop()
    # What the dead gateway left behind: its socket and its pidfile.
    assert socket.exists()
    assert json.loads((run_dir / "gateway.pid").read_text())["pid"] == gw_pid

    with ServerProcess(MODELS, workdir=tmp_path) as second:
        assert second.proc is not None
        assert not socket.exists()
        assert (run_dir / f"gw-{second.proc.pid}.sock").exists()
        assert json.loads((run_dir / "gateway.pid").read_text())["pid"] == second.proc.pid
        r = httpx.post(second.url + "/v1/chat/completions", json=chat_body("ready"), timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert second.orphans == []
    assert not (run_dir / "gateway.pid").exists()
