"""Clients that stop reading: the gateway's memory stays bounded (each stream's buffer is, and
its request is paused in the worker), each one is cut off once its socket has been full for
``write_timeout`` (request cancelled in the worker, slot freed, ledger row says why), and a
reading client on the same model is served meanwhile."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess, non_reader

from ._kit import chat_body, fake, hot, wait_for

WRITE_TIMEOUT = 2.0
FAST = {**fake(FAKE_TOKEN_DELAY=0.002, FAKE_CONTEXT_LENGTH=10**6), "max_concurrency": 8, "max_queue": 100}


BODIES = {
    "/v1/chat/completions": chat_body("fast", max_tokens=500_000, stream=True),
    "/v1/messages": {"model": "fast", "max_tokens": 500_000, "stream": True,
                     "messages": [{"role": "user", "content": "hello there"}]},
    "/v1/responses": {"model": "fast", "input": "hello there", "max_output_tokens": 500_000,
                      "stream": True},
}


def _non_reader(srv: ServerProcess, rid: str, path: str = "/v1/chat/completions") -> socket.socket:
    """A streaming request for half a million tokens from a client that never reads a byte."""
    return non_reader(srv.port, BODIES[path], rid, path)


def _rss(srv: ServerProcess) -> int:
    assert srv.proc is not None
    return int(psutil.Process(srv.proc.pid).memory_info().rss)


def _job(srv: ServerProcess, rid: str) -> dict:
    r = httpx.get(f"{srv.url}/v1/jobs/{rid}", timeout=10)
    r.raise_for_status()
    data: dict = r.json()
    return data


def test_non_reading_streams_are_bounded_cut_and_free_their_slots() -> None:
    n = 50  # the attack: six times max_concurrency (8)
    settings = {"write_timeout": 30.0, "queue_timeout": 90.0}  # long: the lent slots must do it
    with ServerProcess({"fast": FAST}, settings) as srv:
        httpx.post(srv.url + "/admin/models/fast/load", timeout=30).raise_for_status()
        warm = [_non_reader(srv, f"warm{i}") for i in range(2)]  # the code paths, once
        wait_for(lambda: _job(srv, "warm1")["status"] == "cancelled", 60)
        for s in warm:
            s.close()
        rss0 = _rss(srv)
        peak = [rss0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak[0] = max(peak[0], _rss(srv))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        socks = [_non_reader(srv, f"nr{i}") for i in range(n)]
        try:
            wait_for(lambda: hot(srv)["fast"]["parked"] >= 8, 60, what="non-readers parked")
            good = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("fast", max_tokens=20),
                              timeout=120)
            assert good.status_code == 200, good.text
            # Served while every non-reader still hangs on (none cut yet): it did not wait for
            # cuts, because a paused request lends its slot.
            assert not any(_job(srv, f"nr{i}")["status"] == "cancelled" for i in range(n))
            assert good.json()["choices"][0]["finish_reason"] == "length"
            jobs = wait_for(lambda: (js := [_job(srv, f"nr{i}") for i in range(n)])
                            and all(j["status"] != "processing" and j["status"] != "queued" for j in js)
                            and js, 150, step=0.5)
        finally:
            stop.set()
            sampler.join(5)
            for s in socks:
                s.close()
        assert time.monotonic() - t0 < 200
        for j in jobs:
            assert j["status"] == "cancelled", j
            assert j["error"]["type"] == "write_timeout", j
            assert j["usage"]["completion_tokens"] > 0
        wait_for(lambda: hot(srv)["fast"]["inflight"] == 0, 10)
        grown = (peak[0] - rss0) / 2**20
        assert grown <= 20, f"gateway RSS grew by {grown:.1f} MiB under {n} non-reading streams"
        # Each one was paused in the worker: it stopped at a few thousand tokens, not 500000.
        assert max(j["usage"]["completion_tokens"] for j in jobs) < 50_000
        log = srv.log()
        assert "Traceback" not in log
    assert srv.orphans == []


def test_the_anthropic_and_responses_streams_are_cut_the_same_way() -> None:
    with ServerProcess({"fast": FAST}, {"write_timeout": WRITE_TIMEOUT}) as srv:
        socks = [_non_reader(srv, f"nr-{i}", path) for i, path in enumerate(BODIES)]
        try:
            jobs = wait_for(lambda: (js := [_job(srv, f"nr-{i}") for i in range(len(BODIES))])
                            and all(j["status"] == "cancelled" for j in js) and js, 60, step=0.5)
        finally:
            for s in socks:
                s.close()
        for j in jobs:
            assert j["error"]["type"] == "write_timeout", j
        wait_for(lambda: hot(srv)["fast"]["inflight"] == 0, 10)
    assert srv.orphans == []


def test_with_more_non_readers_than_slots_a_reader_is_served_long_before_any_cut() -> None:
    """``max_concurrency`` 2, four non-readers (chat, Anthropic, Responses, chat), and a reading
    client queued behind them while the first two hold both slots. At 20 tokens/s a fixed
    160 KB socket buffer took about 40 s to fill, past ``queue_timeout``, so the reader got 503.
    Each non-reader now yields its slot as soon as its kernel refuses a write while others wait
    (TCP_NOTSENT_LOWAT: about 20 KB, a few seconds), so the reader is answered long before
    ``queue_timeout`` (30 s) and before any non-reader is cut (``write_timeout`` 60 s)."""
    slow = {**fake(FAKE_TOKEN_DELAY=0.05, FAKE_CONTEXT_LENGTH=10**6), "max_concurrency": 2,
            "max_queue": 16}
    paths = [*BODIES, "/v1/chat/completions"]
    settings = {"write_timeout": 60.0, "queue_timeout": 30.0}
    with ServerProcess({"fast": slow}, settings) as srv:
        httpx.post(srv.url + "/admin/models/fast/load", timeout=30).raise_for_status()
        socks = [_non_reader(srv, f"nr{i}", path) for i, path in enumerate(paths)]
        try:
            wait_for(lambda: (h := hot(srv)["fast"])["inflight"] == 2 and h["queued"] == 2, 20,
                     what="two non-readers running, two queued")
            good = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("fast", max_tokens=20),
                              timeout=60)
            assert good.status_code == 200, good.text
            assert good.json()["choices"][0]["finish_reason"] == "length"
            jobs = [_job(srv, f"nr{i}") for i in range(len(paths))]
            assert all(j["status"] == "processing" for j in jobs), jobs  # none cut: it did not wait for that
            assert hot(srv)["fast"]["parked"] >= 3  # each one ahead of it yielded its slot
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: hot(srv)["fast"]["inflight"] == 0, 20)
        assert "Traceback" not in srv.log()
    assert srv.orphans == []
