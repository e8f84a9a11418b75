"""Flow control between a stream and its worker: ``Pause`` stops one request's output (the fake
and the real LM engine take the sequence out of their decode steps; an engine whose
``Engine.pause`` answers False, embeddings, has its output held, merged), and ``Resume`` brings it back with nothing lost. The gateway's stream
buffer sends them; a real tiny LM behind a real gateway stops decoding for a non-reader."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import httpx
import psutil

from mlx_supervisor.gateway.supervisor.transport import RequestStream
from mlx_supervisor.gateway.testing.server import ServerProcess, non_reader, wait_for
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.protocol import Chunk, Done, Generate, Heartbeat, Pause, Ready, Resume

CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]


def _collect(w, seconds: float) -> list:
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            m = w.recv(max(0.001, end - time.monotonic()))
        except TimeoutError:
            break
        if not isinstance(m, Heartbeat):
            out.append(m)
    return out


def _pause_and_resume(w, rid: str, max_tokens: int) -> tuple[str, int]:
    """Stream ``rid``, pause it after a few chunks, check it goes quiet, resume, finish."""
    w.send(Generate(id=rid, messages=CHAT, max_tokens=max_tokens, temperature=0.0))
    text, tokens, seen = "", 0, 0
    while seen < 3:
        m = w.recv(timeout=60)
        if isinstance(m, Chunk):
            seen += 1
            text, tokens = text + m.text, tokens + m.tokens
    w.send(Pause(id=rid))
    settle = _collect(w, 0.5)  # what was already on its way
    text += "".join(m.text for m in settle if isinstance(m, Chunk))
    tokens += sum(m.tokens for m in settle if isinstance(m, Chunk))
    assert not any(isinstance(m, Done) for m in settle), "finished before the pause took"
    quiet = _collect(w, 1.5)
    assert quiet == [], f"{len(quiet)} messages while paused"
    w.send(Resume(id=rid))
    rest = w.until(Done, timeout=60)
    text += "".join(m.text for m in rest if isinstance(m, Chunk))
    tokens += sum(m.tokens for m in rest if isinstance(m, Chunk))
    assert rest[-1].completion_tokens == max_tokens
    return text, tokens


def test_fake_worker_pauses_one_sequence_and_resumes_it(workers) -> None:
    w = workers.spawn("f", "fake", env={"FAKE_TOKEN_DELAY": "0.01"})
    w.recv(timeout=30)  # Hello
    assert isinstance(w.recv(timeout=30), Ready)
    text, tokens = _pause_and_resume(w, "r1", 200)
    assert tokens == 200 and text.split() == [f"tok{i}" for i in range(200)]


def test_lm_worker_pauses_a_sequence_and_loses_nothing(workers, demo_model_dir: Path) -> None:
    w = workers.spawn("tiny", "lm", demo_model_dir)
    w.recv(timeout=30)
    assert isinstance(w.recv(timeout=60), Ready)
    w.send(Generate(id="ref", messages=CHAT, max_tokens=300, temperature=0.0))
    ref = w.until(Done, timeout=60)
    want = "".join(m.text for m in ref if isinstance(m, Chunk))
    text, tokens = _pause_and_resume(w, "r2", 300)
    assert tokens == 300 and text == want


def test_the_stream_buffer_pauses_resumes_and_caps_a_reader_that_fell_behind() -> None:
    async def run() -> None:
        sent: list[p.Base] = []
        s = RequestStream("r", "w", lambda _w, m: sent.append(m) or True, high=8)
        for i in range(7):
            s.put(p.Chunk(id="r", text=f"t{i}"))
        assert sent == []
        s.put(p.Chunk(id="r", text="t7"))
        assert sent == [p.Pause(id="r")]
        it = s.__aiter__()
        for _ in range(6):  # down to 2 left: a quarter of the buffer
            await it.__anext__()
        assert sent == [p.Pause(id="r"), p.Resume(id="r")]
        for i in range(40):  # a worker that ignores Pause: capped at 4x, then cancelled
            s.put(p.Chunk(id="r", text=f"x{i}"))
        assert isinstance(sent[-1], p.Cancel) and s.overflowed
        assert s.queue.qsize() <= 4 * 8 + 1
        msgs = [m async for m in it]
        assert isinstance(msgs[-1], p.Error) and msgs[-1].code == "slow_consumer"

    asyncio.run(run())


def _non_reader(srv: ServerProcess, rid: str, max_tokens: int) -> socket.socket:
    return non_reader(srv.port, {"model": "demo", "messages": CHAT, "max_tokens": max_tokens,
                                 "temperature": 0.0, "stream": True}, rid)


def test_a_non_reading_stream_stops_taking_decode_steps_in_a_real_lm_worker(
        demo_model_dir: Path) -> None:
    models = {"demo": {"path": str(demo_model_dir), "context_length": 200_000}}
    with ServerProcess(models, {"write_timeout": 15.0}) as srv:
        sock = _non_reader(srv, "nr", 150_000)
        try:
            wait_for(lambda: "nr paused after" in srv.log(), 120, what="the non-reader paused")
            good = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
                "model": "demo", "messages": CHAT, "max_tokens": 20, "temperature": 0.0})
            assert good.status_code == 200, good.text
            assert good.json()["usage"]["completion_tokens"] == 20
            job = httpx.get(f"{srv.url}/v1/jobs/nr", timeout=10).json()
            assert job["status"] == "processing", job
            worker = psutil.Process(job["pid"])
            seen, cpu = _flow_events(srv), sum(worker.cpu_times()[:2])
            time.sleep(3)
            used = sum(worker.cpu_times()[:2]) - cpu
            assert _flow_events(srv) == seen and seen[-1][0] == "paused", seen
            # Decoding on would take about a core; paused, the worker only sends heartbeats.
            assert used < 1.0, f"the worker used {used:.2f} CPU-s in 3 s with its one request paused"
            wait_for(lambda: "nr cancelled" in srv.log(), 60, what="the cut")
        finally:
            sock.close()
        job = httpx.get(f"{srv.url}/v1/jobs/nr", timeout=10).json()
        assert job["status"] == "cancelled" and job["error"]["type"] == "write_timeout", job
        assert 0 < job["usage"]["completion_tokens"] < 150_000
    assert srv.orphans == []


def _flow_events(srv: ServerProcess) -> list[tuple[str, str]]:
    """The LM engine's pause/resume log lines for the request "nr": (verb, tokens so far)."""
    return re.findall(r"nr (paused|resumed) after (\d+) tokens", srv.log())


def test_a_stream_cut_at_write_timeout_is_never_resumed_before_its_cancel() -> None:
    async def run() -> None:
        sent: list[p.Base] = []
        cut = False
        s = RequestStream("r", "w", lambda _w, m: sent.append(m) or True, high=8)
        s.cut = lambda: cut
        for i in range(8):
            s.put(p.Chunk(id="r", text=f"t{i}"))
        assert sent == [p.Pause(id="r")]
        cut = True  # the connection was aborted: the route drains what is queued, then cancels
        it = s.__aiter__()
        for _ in range(8):
            await it.__anext__()
        assert sent == [p.Pause(id="r")]

    asyncio.run(run())


def test_a_parked_stream_stays_paused_until_both_its_backlog_and_its_park_are_over() -> None:
    """The worker hears one Pause when the first cause starts (backlog or the supervisor's park)
    and one Resume when the last ends; a stream whose client was cut never hears Resume."""
    async def run() -> None:
        sent: list[p.Base] = []
        s = RequestStream("r", "w", lambda _w, m: sent.append(m) or True, high=4)
        s.hold(True)  # parked: its client is behind while others wait
        assert sent == [p.Pause(id="r")]
        for i in range(4):
            s.put(p.Chunk(id="r", text=f"t{i}"))  # the backlog starts too: no second Pause
        assert sent == [p.Pause(id="r")] and s.backlog
        it = s.__aiter__()
        for _ in range(4):
            await it.__anext__()
        assert not s.backlog and sent == [p.Pause(id="r")]  # still parked: no Resume
        s.hold(False)
        assert sent == [p.Pause(id="r"), p.Resume(id="r")]
        cut = RequestStream("c", "w", lambda _w, m: sent.append(m) or True, high=4)
        cut.cut = lambda: True
        cut.hold(True)
        cut.hold(False)
        assert sent[-1] == p.Pause(id="c")

    asyncio.run(run())
