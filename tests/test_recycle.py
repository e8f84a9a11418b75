"""Recycling an evicted worker, end to end with real workers and two tiny llamas of different
weights: under a budget with room for one, each miss unloads the idle model and loads the new
one in the same process. The recycled process answers as a fresh one, the ledger charges its
measured footprint and never exceeds the budget, and nothing outlives the gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, alive, wait_for


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlx_supervisor.worker.demo import lm as demo_model

    return demo_model.build(tmp_path_factory.mktemp("recycle") / "other", seed=1)


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another shape: 4x the width, 3 layers, a padded vocabulary (4x the tiny llama's bytes)."""
    from mlx_supervisor.worker.demo import lm as demo_model

    return demo_model.build(tmp_path_factory.mktemp("recycle") / "bigger", seed=2,
                            hidden_size=256, num_layers=3, intermediate_size=512,
                            vocab_size=2048)


def _ps(srv: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(srv.url + "/admin/ps", timeout=10).json()
    return data


def _complete(srv: ServerProcess, model: str) -> str:
    r = httpx.post(srv.url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": "hello there", "max_tokens": 8,
                         "temperature": 0})
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


def _pid(srv: ServerProcess, model: str) -> int:
    return next(int(w["pid"]) for w in _ps(srv)["workers"] if w["model"] == model)


def test_a_recycled_worker_answers_as_a_fresh_one_within_the_budget(
        demo_model_dir: Path, other_model: Path) -> None:
    models = {"a": {"path": str(demo_model_dir), "memory": "500MB"},
              "b": {"path": str(other_model), "memory": "500MB"}}
    with ServerProcess(models, {"memory_budget": "800MB", "recycle_workers": 4}) as srv:
        fresh_a = _complete(srv, "a")
        pid = _pid(srv, "a")
        fresh_b_elsewhere = _complete(srv, "b")  # a is evicted: its process unloads, takes b
        assert _pid(srv, "b") == pid and "unloaded a" in srv.log()
        assert _complete(srv, "a") == fresh_a  # recycled back into a: the same greedy tokens
        assert _pid(srv, "a") == pid
        assert _complete(srv, "b") == fresh_b_elsewhere
        ps = _ps(srv)
        assert ps["used_bytes"] <= ps["budget_bytes"]
        (w,) = [w for w in ps["workers"] if not w["spare"]]
        assert w["pid"] == pid and 0 < w["memory_bytes"] <= ps["budget_bytes"]
    assert not srv.orphans and not alive(pid)


def test_b_fresh_and_recycled_give_the_same_tokens(demo_model_dir: Path, other_model: Path) -> None:
    """The reference for b from a process that never held another model."""
    with ServerProcess({"b": {"path": str(other_model)}}) as srv:
        fresh = _complete(srv, "b")
    models = {"a": {"path": str(demo_model_dir), "memory": "500MB"},
              "b": {"path": str(other_model), "memory": "500MB"}}
    with ServerProcess(models, {"memory_budget": "800MB", "recycle_workers": 4}) as srv:
        _complete(srv, "a")
        pid = _pid(srv, "a")
        assert _complete(srv, "b") == fresh and _pid(srv, "b") == pid


def test_a_worker_killed_while_unloading_is_survived(demo_model_dir: Path,
                                                     other_model: Path) -> None:
    """The recycled process dies as it is told to unload: the admission falls back to a new
    process and b is served; the death is no crash of a's (a stays admissible)."""
    import os
    import signal

    models = {"a": {"path": str(demo_model_dir), "memory": "500MB"},
              "b": {"path": str(other_model), "memory": "500MB"}}
    with ServerProcess(models, {"memory_budget": "800MB", "recycle_workers": 4}) as srv:
        _complete(srv, "a")
        pid = _pid(srv, "a")
        os.kill(pid, signal.SIGSTOP)  # it cannot unload: the unload timeout kills it
        try:
            _complete(srv, "b")
        finally:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert _pid(srv, "b") != pid
        wait_for(lambda: not alive(pid), 10, what="the stuck worker reaped")
        assert "did not unload within" in srv.log() or "missed heartbeats" in srv.log()
        _complete(srv, "a")
    assert not srv.orphans


def test_a_recycled_worker_serves_a_model_of_another_size(demo_model_dir: Path,
                                                           bigger_model: Path) -> None:
    """Recycling across shapes: the process that held the tiny llama loads one 4x its size
    (other width, depth and vocabulary) and back, each answering as a fresh process does."""
    with ServerProcess({"big": {"path": str(bigger_model)}}) as srv:
        fresh_big = _complete(srv, "big")
    models = {"a": {"path": str(demo_model_dir), "memory": "500MB"},
              "big": {"path": str(bigger_model), "memory": "500MB"}}
    with ServerProcess(models, {"memory_budget": "800MB", "recycle_workers": 4}) as srv:
        fresh_a = _complete(srv, "a")
        pid = _pid(srv, "a")
        assert fresh_big != fresh_a
        assert _complete(srv, "big") == fresh_big and _pid(srv, "big") == pid
        assert _complete(srv, "a") == fresh_a and _pid(srv, "a") == pid
        ps = _ps(srv)
        assert ps["used_bytes"] <= ps["budget_bytes"]
    assert not srv.orphans and not alive(pid)
