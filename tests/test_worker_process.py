"""Real worker processes over ZeroMQ: the contract the gateway relies on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mlx_supervisor.shared.protocol import (
    EXIT_LOAD_FAILED,
    EXIT_PARENT_GONE,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Done,
    Error,
    Generate,
    Heartbeat,
    Hello,
    Load,
    LoadFailed,
    Ping,
    Ready,
    Shutdown,
    Started,
)

CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]


def drain(w, seconds: float) -> list:
    """Everything (heartbeats included) that arrives within ``seconds``."""
    out, end = [], time.monotonic() + seconds
    while True:
        try:
            out.append(w.recv(max(0.001, end - time.monotonic()), skip_heartbeats=False))
        except TimeoutError:
            return out


def test_lm_worker_serves_streams_cancels_and_shuts_down(workers, demo_model_dir: Path):
    w = workers.spawn("tiny", "lm", demo_model_dir, heartbeat=0.2)
    assert w.recv(timeout=30) == Hello(pid=w.pid, protocol=PROTOCOL_VERSION)
    ready = w.recv(timeout=30)
    assert isinstance(ready, Ready), ready
    assert ready.kind == "lm" and ready.context_length == 2048 and ready.pid == w.pid
    assert ready.memory.active > 0 and ready.memory.rss > 0

    # A streamed request, with heartbeats interleaved in the stream.
    w.send(Generate(id="req-stream-1", messages=CHAT, max_tokens=400, temperature=0.0))
    msgs = w.until(Done, timeout=60, skip_heartbeats=False)
    assert isinstance(msgs[0], Started | Heartbeat)
    chunks = [m for m in msgs if isinstance(m, Chunk)]
    assert sum(c.tokens for c in chunks) == 400 and msgs[-1].finish_reason == "length"
    kinds = "".join("H" if isinstance(m, Heartbeat) else "c" if isinstance(m, Chunk) else "-"
                    for m in msgs)
    assert "cHc" in kinds, f"no heartbeat during a long decode: {kinds}"
    assert all(m.memory.rss > 0 and m.inflight == 1 for m in msgs[kinds.index("cHc") + 1:]
               if isinstance(m, Heartbeat))

    # Cancel mid-stream: the stream stops, the worker keeps serving.
    w.send(Generate(id="req-cancel-2", messages=CHAT, max_tokens=1900, temperature=0.0))
    seen = 0
    while seen < 5:
        m = w.recv(timeout=30)
        seen += isinstance(m, Chunk)
    w.send(Cancel(id="req-cancel-2"))
    tail = drain(w, 0.5)
    assert not any(isinstance(m, Done | Error) for m in tail)
    late = [m for m in drain(w, 0.5) if not isinstance(m, Heartbeat)]
    assert late == [], late
    hb = w.recv(timeout=2, skip_heartbeats=False)
    assert isinstance(hb, Heartbeat) and hb.inflight == 0

    # A user error is a 400 with the numbers, through the process too.
    w.send(Generate(id="req-long-3", prompt_ids=[5] * 3000))
    err = w.until(Error)[-1]
    assert (err.id, err.status, err.code) == ("req-long-3", 400, "context_length_exceeded")
    assert "2048" in err.message and "3000" in err.message

    # Shutdown with a request in flight: it gets a 503, the process exits 0 promptly.
    w.send(Generate(id="req-inflight-4", messages=CHAT, max_tokens=1900, temperature=0.0))
    w.until(Chunk)
    t0 = time.monotonic()
    w.send(Shutdown(reason="test"))
    err = w.until(Error)[-1]
    assert (err.id, err.status, err.code) == ("req-inflight-4", 503, "worker_shutdown")
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 2.0
    log = w.stderr()
    for rid in ("req-stream-1", "req-cancel-2", "req-long-3", "req-inflight-4"):
        assert rid in log
    assert f"tiny[{w.pid}]" in log


def test_missing_path_is_load_failed_exit_3(workers, tmp_path: Path):
    w = workers.spawn("nope", "lm", tmp_path / "does-not-exist")
    assert isinstance(w.recv(timeout=30), Hello)
    failed = w.recv(timeout=30)
    assert isinstance(failed, LoadFailed) and "does-not-exist" in failed.reason
    assert w.wait(10) == EXIT_LOAD_FAILED
    assert "does-not-exist" in w.stderr()


def test_spare_loads_on_request_and_rejects_bad_config(workers, demo_model_dir: Path,
                                                       tmp_path: Path):
    spare = workers.spawn(kind="lm", spare=True)
    assert isinstance(spare.recv(timeout=30), Hello)
    t0 = time.monotonic()
    spare.send(Load(model_id="tiny-late", path=str(demo_model_dir), kind="lm",
                    context_length=512))
    ready = spare.recv(timeout=30)
    assert isinstance(ready, Ready) and ready.context_length == 512
    assert time.monotonic() - t0 < 1.5  # imports were done ahead of the Load
    spare.send(Generate(id="req-spare-1", prompt="hi", max_tokens=3, temperature=0.0))
    assert spare.until(Done)[-1].completion_tokens == 3
    assert "tiny-late[" in spare.stderr()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    broken = workers.spawn(kind="lm", spare=True)
    assert isinstance(broken.recv(timeout=30), Hello)
    broken.send(Load(model_id="broken", path=str(bad), kind="lm"))
    failed = broken.recv(timeout=30)
    assert isinstance(failed, LoadFailed) and "broken" in failed.reason
    assert broken.wait(10) == EXIT_LOAD_FAILED
    spare.send(Shutdown())
    assert spare.wait(5) == 0


def test_fake_worker_streams_stops_and_reports_memory(workers):
    w = workers.spawn("fake-1", "fake", heartbeat=0.1,
                      env={"FAKE_MEMORY_BYTES": "5000", "FAKE_MEMORY_GROWTH": "100"})
    assert isinstance(w.recv(), Hello)
    ready = w.recv()
    assert isinstance(ready, Ready) and ready.memory.active == 5000
    w.send(Generate(id="f1", prompt="one two three", max_tokens=10, stop=["tok4"]))
    msgs = w.until(Done)
    assert msgs[0] == Started(id="f1", prompt_tokens=3)
    assert "".join(m.text for m in msgs if isinstance(m, Chunk)) == "tok0 tok1 tok2 tok3 "
    assert msgs[-1].finish_reason == "stop"
    w.send(Generate(id="f2", messages=[{"role": "user", "content": "a b"}], max_tokens=3))
    d = w.until(Done)[-1]
    assert (d.finish_reason, d.prompt_tokens, d.completion_tokens) == ("length", 2, 3)
    beats = [m for m in drain(w, 0.4) if isinstance(m, Heartbeat)]
    assert beats and beats[-1].memory.active == 5200
    t0 = time.monotonic()
    w.send(Shutdown())
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 1.0


def test_fake_slow_load_heartbeats_then_token_delay_and_cancel(workers):
    w = workers.spawn("fake-slow", "fake", heartbeat=0.1,
                      env={"FAKE_LOAD_SECONDS": "0.6", "FAKE_TOKEN_DELAY": "0.05"})
    assert isinstance(w.recv(), Hello)
    before = w.until(Ready, skip_heartbeats=False)
    assert sum(isinstance(m, Heartbeat) for m in before) >= 3  # heartbeats while loading
    w.send(Generate(id="slow", prompt="x", max_tokens=1000))
    w.until(Chunk)
    w.send(Cancel(id="slow"))
    drain(w, 0.2)
    assert [m for m in drain(w, 0.4) if not isinstance(m, Heartbeat)] == []


def test_fake_load_failure_and_crash(workers):
    failing = workers.spawn("fake-fail", "fake", env={"FAKE_LOAD_FAIL": "disk on fire"})
    crashing = workers.spawn("fake-crash", "fake", env={"FAKE_CRASH_AT_LOAD": "1"})
    assert isinstance(failing.recv(), Hello)
    failed = failing.recv()
    assert isinstance(failed, LoadFailed) and "disk on fire" in failed.reason
    assert failing.wait(10) == EXIT_LOAD_FAILED
    assert crashing.wait(10) == 1
    assert "FAKE_CRASH_AT_LOAD" in crashing.stderr()


def test_fake_hang_word_stops_everything(workers):
    w = workers.spawn("fake-hang", "fake", heartbeat=0.1, env={"FAKE_HANG_WORD": "freeze"})
    w.until(Ready)
    w.send(Generate(id="h", prompt="please freeze now", max_tokens=5))
    time.sleep(0.3)
    drain(w, 0.1)
    assert drain(w, 0.6) == []  # no heartbeats, no answers
    w.send(Ping())
    assert drain(w, 0.3) == []
    assert w.proc.poll() is None  # hung, not dead: the supervisor must kill it


def test_gateway_silence_exits_4_and_pings_keep_alive(workers):
    pinged = workers.spawn("fake-pinged", "fake", gateway_timeout=0.8)
    silent = workers.spawn("fake-silent", "fake", gateway_timeout=0.8)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        pinged.send(Ping())
        time.sleep(0.2)
    assert silent.wait(5) == EXIT_PARENT_GONE
    assert pinged.proc.poll() is None
    assert pinged.wait(5) == EXIT_PARENT_GONE  # once the pings stop


def _ends_within(proc: psutil.Process, seconds: float) -> bool:
    """Gone or a zombie (a container's pid 1 may be slow to reap orphans)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_worker_dies_with_its_parent(workers):
    """The gateway dies -> PDEATHSIG (or the parent-pid watch) takes the worker down."""
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'mlx_supervisor.worker', '--kind', 'fake',"
        f" '--model-id', 'orphan', '--endpoint', {workers.endpoint!r}, '--worker-id', 'orphan'])\n"
        "print(p.pid, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None and parent.stdin is not None
        pid = int(parent.stdout.readline())
        child = psutil.Process(pid)
        assert isinstance(workers.next_for("orphan", time.monotonic() + 20), Hello)
        assert child.is_running()
        parent.stdin.close()  # the parent exits
        parent.wait(5)
        assert _ends_within(child, 5), "worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_bad_args_exit_2():
    r = subprocess.run([sys.executable, "-m", "mlx_supervisor.worker", "--kind", "fake"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--endpoint" in r.stderr


def test_fake_path_imports_neither_mlx_nor_starlette():
    code = ("import sys, json\n"
            "from mlx_supervisor.worker import main, engines\n"
            "engines.make_engine('fake').load('')\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlx', 'mlx_lm', 'starlette', 'transformers'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
