"""Flow control in the VLM engine, on a tiny real Qwen2-VL: a paused request keeps its generator
and takes no tokens, the next request runs meanwhile (a slow reader no longer holds the model),
and on resume the paused one gives exactly the tokens it would have given unpaused. End to end:
a VLM stream whose client never reads is paused in its worker, and another client's VLM request
is answered while it stays paused."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, non_reader, wait_for
from mlx_supervisor.shared.protocol import Chunk, Done, Generate
from mlx_supervisor.worker.engines.vlm import VLMEngine
from tests.test_engine_vlm import ask, png

NO_EOS = {2: -100.0, 0: -100.0}  # the tiny model's end tokens, kept out so answers run long


@pytest.fixture(scope="module")
def engine(vlm_model_dir: Path):
    e = VLMEngine()
    e.load(str(vlm_model_dir))
    yield e
    e.close()


def _req(rid: str, **kw: Any) -> Generate:
    return Generate(id=rid, messages=ask(f"Describe {rid}."), images=[png()],
                    logit_bias=NO_EOS, **{"max_tokens": 24, **kw})


def _text(msgs: list[Any]) -> str:
    return "".join(m.text for m in msgs if isinstance(m, Chunk))


def _alone(engine: VLMEngine, req: Generate) -> list[Any]:
    out: list[Any] = []
    engine.submit(req, out.append)
    while engine.has_work():
        engine.step(out.append)
    return out


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_a_paused_request_lets_the_next_run_and_resumes_exactly(
        engine: VLMEngine, sampling: dict[str, Any]) -> None:
    ref = _alone(engine, _req("a", **sampling))
    out: dict[str, list[Any]] = {"a": [], "b": []}

    def emit(m: Any) -> None:
        out[m.id].append(m)

    engine.submit(_req("a", **sampling), emit)
    for _ in range(5):  # five tokens (the first comes with the prefill)
        engine.step(emit)
    assert engine.live["a"].completion == 5
    engine.pause("a")
    held = len(out["a"])
    engine.submit(_req("b", temperature=0.0, max_tokens=12), emit)
    while engine.has_work():  # only b has work now: a is paused
        engine.step(emit)
    assert isinstance(out["b"][-1], Done) and out["b"][-1].completion_tokens == 12
    assert len(out["a"]) == held, "the paused request took tokens"
    assert engine.live.keys() == {"a"}
    engine.resume("a")
    while engine.has_work():
        engine.step(emit)
    assert isinstance(out["a"][-1], Done) and out["a"][-1].completion_tokens == 24
    assert _text(out["a"]) == _text(ref)


def test_cancel_while_paused_forgets_the_request(engine: VLMEngine) -> None:
    out: list[Any] = []
    engine.submit(_req("c"), out.append)
    for _ in range(4):
        engine.step(out.append)
    engine.pause("c")
    assert not engine.has_work()
    engine.cancel("c")
    engine.resume("c")  # a late Resume for a cancelled request is a no-op
    assert not engine.live and not engine.paused and not engine.has_work()
    assert not any(isinstance(m, Done) for m in out)


def _non_reader(port: int, rid: str) -> socket.socket:
    return non_reader(port, {"model": "vlm", "stream": True, "max_tokens": 3500,
                             "temperature": 0.0,
                             "logit_bias": {str(k): v for k, v in NO_EOS.items()},
                             "messages": [{"role": "user", "content": "Say a lot."}]}, rid)


def test_a_paused_vlm_stream_does_not_delay_another_vlm_request(vlm_model_dir: Path) -> None:
    models = {"vlm": {"path": str(vlm_model_dir), "max_concurrency": 1}}
    with ServerProcess(models, {"write_timeout": 20.0}) as srv:
        sock = _non_reader(srv.port, "nr")
        try:
            wait_for(lambda: "nr paused after" in srv.log(), 90, what="the non-reader paused")
            good = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "vlm", "max_tokens": 8, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Hi"}]})
            assert good.status_code == 200, good.text
            assert good.json()["usage"]["completion_tokens"] <= 8
            job = httpx.get(f"{srv.url}/v1/jobs/nr", timeout=10).json()
            assert job["status"] == "processing", job  # still there, paused: not finished first
            assert "nr resumed" not in srv.log()
        finally:
            sock.close()
    assert srv.orphans == []
