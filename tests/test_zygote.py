"""The fork server: workers forked by the zygote are sound and never orphaned.

Real processes throughout: the zygote (``python -m mlx_supervisor.worker.zygote``) imports the
MLX stack, forks real LM workers that load the real tiny demo llama and talk to a test-owned
ROUTER. This test process plays the gateway (``ForkServer`` makes it a child subreaper, so the
forked workers are its children), except in the ``kill -9`` test, where a child process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from mlx_supervisor.gateway.supervisor import forkserver
from mlx_supervisor.gateway.supervisor.process import WorkerProcess, worker_env
from mlx_supervisor.shared.protocol import Chunk, Done, Generate, Ready, encode
from mlx_supervisor.worker import zygote

PROMPT = "The quick brown fox"


def _argv(endpoint: str, wid: str, path: Path) -> list[str]:
    return ["--endpoint", endpoint, "--worker-id", wid, "--kind", "lm", "--model-id", "m",
            "--path", str(path), "--heartbeat-interval", "0.2"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _generate(workers: Any, wid: str, **kw: Any) -> tuple[str, int]:
    """Greedy text and completion tokens from worker ``wid`` over the factory's ROUTER."""
    deadline = time.monotonic() + 60
    req = Generate(id=f"{wid}-{time.monotonic_ns()}", prompt=PROMPT, max_tokens=24,
                   temperature=0.0, **kw)
    workers.router.send_multipart([wid.encode(), encode(req)])
    text = ""
    while True:
        msg = workers.next_for(wid, deadline)
        assert msg is not None, f"no reply from {wid}"
        if isinstance(msg, Chunk) and msg.id == req.id:
            text += msg.text
        elif isinstance(msg, Done) and msg.id == req.id:
            return text, msg.completion_tokens


def _ready(workers: Any, wid: str) -> Ready:
    deadline = time.monotonic() + 120
    while True:
        msg = workers.next_for(wid, deadline)
        assert msg is not None, f"{wid} never became ready"
        if isinstance(msg, Ready):
            return msg


async def _stop(wp: WorkerProcess) -> None:
    wp.signal_group(signal.SIGKILL)
    await asyncio.wait_for(wp.wait(), 10)


def _libmlx_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        return "libmlx" in f.read()


@pytest.mark.parametrize("pre_mlx", ["0", "1"], ids=["imports-mlx", "pre-mlx"])
def test_forked_workers_give_the_same_greedy_tokens_as_spawned_ones(
        workers: Any, demo_model_dir: Path, pre_mlx: str) -> None:
    """Both zygote modes: with mlx imported (CPU, the default there) and stopping short of mlx
    (the CUDA backend's default, forced here), where each child imports mlx itself. On MLX's
    CUDA backend ``import mlx.core`` creates a CUDA context, so there the mlx-importing zygote
    must say so and refuse every fork (nothing forks after a CUDA context exists)."""
    spawned = workers.spawn("m", "lm", demo_model_dir)
    _ready(workers, spawned.worker_id)
    want = _generate(workers, spawned.worker_id)
    assert want[1] == 24 and want[0]
    refuses = pre_mlx == "0" and zygote.cuda_backend()

    async def main() -> None:
        fs = forkserver.ForkServer(worker_env({zygote.PRE_MLX_ENV: pre_mlx}))
        await fs.start()
        hello = await fs.ready(120)
        assert hello.pid == fs.pid
        assert hello.pre_mlx == (pre_mlx == "1") and hello.cuda == refuses
        assert _libmlx_mapped(hello.pid) == (pre_mlx == "0")
        kids: list[WorkerProcess] = []
        try:
            if refuses:
                with pytest.raises(RuntimeError, match="CUDA context"):
                    await fs.fork("f0", _argv(workers.endpoint, "f0", demo_model_dir),
                                  worker_env({}), "f0")
            # Two from one zygote: the second is as sound as the first.
            for wid in () if refuses else ("f1", "f2"):
                wp = await fs.fork(wid, _argv(workers.endpoint, wid, demo_model_dir),
                                   worker_env({}), wid)
                kids.append(wp)
                _ready(workers, wid)
                assert _generate(workers, wid) == want
                me = psutil.Process(wp.pid)
                assert me.ppid() == os.getpid()  # the gateway's child, not the zygote's
                assert os.getpgid(wp.pid) == wp.pid and os.getsid(wp.pid) == wp.pid
                assert me.cmdline()[1:3] == ["-m", "mlx_supervisor.worker.zygote"]
            assert refuses or kids[0].pid != kids[1].pid
        finally:
            for wp in kids:
                await _stop(wp)
            await fs.stop()
        assert fs.proc is not None and fs.proc.exited

    asyncio.run(main())


def test_a_zygote_crash_leaves_its_workers_serving_and_fails_pending_forks(
        workers: Any, demo_model_dir: Path) -> None:
    async def main() -> None:
        fs = forkserver.ForkServer(worker_env({}))
        zygote = await fs.start()
        await fs.ready(120)
        wp = await fs.fork("c1", _argv(workers.endpoint, "c1", demo_model_dir),
                           worker_env({}), "c1")
        try:
            _ready(workers, "c1")
            before = _generate(workers, "c1")
            os.kill(zygote.pid, signal.SIGKILL)
            assert await asyncio.wait_for(zygote.wait(), 10) == -signal.SIGKILL
            await asyncio.sleep(0.2)
            assert not fs.alive
            with pytest.raises(RuntimeError):
                await fs.fork("c2", _argv(workers.endpoint, "c2", demo_model_dir),
                              worker_env({}), "c2")
            assert not wp.exited and _generate(workers, "c1") == before
        finally:
            await _stop(wp)
        assert wp.exited and _gone(wp.pid)

    asyncio.run(main())


GATEWAY = textwrap.dedent("""
    import asyncio, sys
    from mlx_supervisor.gateway.supervisor import forkserver
    from mlx_supervisor.gateway.supervisor.process import worker_env

    async def main():
        fs = forkserver.ForkServer(worker_env({}))
        await fs.start()
        await fs.ready(120)
        argv = ["--endpoint", sys.argv[1], "--worker-id", "k1", "--kind", "lm",
                "--model-id", "m", "--path", sys.argv[2], "--heartbeat-interval", "0.2"]
        wp = await fs.fork("k1", argv, worker_env({}), "k1")
        print(fs.pid, wp.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def test_gateway_kill_9_leaves_neither_zygote_nor_forked_worker(
        workers: Any, demo_model_dir: Path) -> None:
    gw = subprocess.Popen([sys.executable, "-c", GATEWAY, workers.endpoint, str(demo_model_dir)],
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids: list[int] = []
    try:
        assert gw.stdout is not None
        pids = [int(x) for x in gw.stdout.readline().split()]
        assert len(pids) == 2, pids
        _ready(workers, "k1")  # the forked worker is up and loaded
        gw.send_signal(signal.SIGKILL)
        gw.wait(10)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(p) for p in pids), [(p, psutil.Process(p).status()) for p in pids
                                             if not _gone(p)]
    finally:
        for pid in [gw.pid, *pids]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        gw.wait(10)


def _exists(pid: int) -> bool:
    """Running or a zombie (not reaped yet)."""
    return psutil.pid_exists(pid)


async def _standby(fs: forkserver.ForkServer, other: int = 0) -> psutil.Process:
    """The zygote's intermediate forked ahead (a new one, when ``other`` is the last one's pid)."""
    deadline = time.monotonic() + 30
    while fs.standby is None or fs.standby.pid == other:
        assert time.monotonic() < deadline, "the zygote forked no intermediate ahead"
        await asyncio.sleep(0.02)
    return fs.standby


def test_the_intermediate_forked_ahead_is_used_charged_and_reaped(
        workers: Any, demo_model_dir: Path) -> None:
    """A fork takes the intermediate forked ahead (and another is forked after it); it is
    charged with the zygote; a clean stop reaps it in the zygote, a zygote crash leaves it
    to the gateway, which reaps it: neither leaves a zombie."""
    async def main() -> None:
        fs = forkserver.ForkServer(worker_env({}))
        await fs.start()
        await fs.ready(120)
        first = await _standby(fs)
        assert first.ppid() == fs.pid and fs.standby_bytes > 0
        wp = await fs.fork("s1", _argv(workers.endpoint, "s1", demo_model_dir),
                           worker_env({}), "s1")
        try:
            assert psutil.Process(wp.pid).ppid() in (first.pid, os.getpid())  # its child
            _ready(workers, "s1")
            second = await _standby(fs, other=first.pid)
            assert not _exists(first.pid)  # used, exited, reaped by the zygote
            zygote_pid = fs.pid
            assert zygote_pid is not None
            os.kill(zygote_pid, signal.SIGKILL)
            assert fs.proc is not None
            await asyncio.wait_for(fs.proc.wait(), 10)
            fs.reap_standby()  # what ForkLauncher does once the zygote is reaped
            deadline = time.monotonic() + 10
            while _exists(second.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert not _exists(second.pid)  # dead with the zygote, and reaped by us
            assert _generate(workers, "s1")[1] == 24  # the worker itself lives on
        finally:
            await _stop(wp)
        fs2 = forkserver.ForkServer(worker_env({}))
        await fs2.start()
        await fs2.ready(120)
        third = await _standby(fs2)
        await fs2.stop()
        assert not _exists(third.pid)  # the zygote reaped it on its way out

    asyncio.run(main())
