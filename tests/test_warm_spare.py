"""The warm spare: a worker with its imports done waits for a model; a load adopts it and a
new spare starts in the background. It is counted in the ledger and evicted first."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for


def _ps(srv: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(srv.url + "/admin/ps", timeout=10).json()
    return data


def _spare(srv: ServerProcess, ready: bool = True) -> dict[str, Any] | None:
    for w in _ps(srv)["workers"]:
        if w["spare"] and (not ready or w["state"] == "idle"):
            return w
    return None


def _wait(cond: Any, timeout: float = 90.0) -> Any:  # imports take long on a loaded box
    return wait_for(cond, timeout)


def test_a_load_adopts_the_warm_spare_and_a_new_one_follows(demo_model_dir: Path) -> None:
    with ServerProcess({"demo": {"path": str(demo_model_dir)}}, {"warm_spare": True}) as srv:
        spare = _wait(lambda: _spare(srv))
        _wait(lambda: (_spare(srv) or {}).get("memory_bytes", 0) > 0)  # measured, in the ledger
        assert _ps(srv)["used_bytes"] >= _spare(srv)["memory_bytes"]  # type: ignore[index]
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        demo = {w["model"]: w for w in _ps(srv)["workers"]}["demo"]
        assert demo["pid"] == spare["pid"] and demo["state"] == "ready"
        new = _wait(lambda: _spare(srv))
        assert new["pid"] != spare["pid"]
        assert "loading in the warm spare" in srv.log()


def test_the_spare_never_displaces_a_model(demo_model_dir: Path) -> None:
    # A budget with room for one model only: the spare waits, and is evicted first when needed.
    with ServerProcess({"demo": {"path": str(demo_model_dir), "memory": "500MB"}},
                       {"warm_spare": True, "memory_budget": "700MB"}) as srv:
        _wait(lambda: _spare(srv, ready=False))
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        time.sleep(1.0)
        snap = _ps(srv)
        assert snap["used_bytes"] <= snap["budget_bytes"]
        assert [w["model"] for w in snap["workers"] if not w["spare"]] == ["demo"]
