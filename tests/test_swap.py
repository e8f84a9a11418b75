"""Swap speed through a real gateway: the zygote serves every miss, is supervised, and
admission learns a model's footprint. Real gateway, zygote and workers, the real tiny llama."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, alive, wait_for

IMPORT_WAIT = 120.0  # the zygote's imports on a loaded 2-core box


@pytest.fixture(scope="module")
def three_models(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap-models")
    out = {}
    for k in "abc":
        out[k] = root / k
        shutil.copytree(demo_model_dir, out[k])
    return out


def _ps(srv: ServerProcess) -> dict[str, Any]:
    return httpx.get(srv.url + "/admin/ps", timeout=10).json()


def _zygote(srv: ServerProcess) -> dict[str, Any] | None:
    z = _ps(srv).get("zygote")
    return z if z and z.get("ready") else None


def _complete(srv: ServerProcess, model: str) -> dict[str, Any]:
    r = httpx.post(srv.url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _gateway(models: dict[str, Path], **settings: Any) -> ServerProcess:
    return ServerProcess(models={k: {"path": str(p), "kind": "lm"} for k, p in models.items()},
                         settings={"fork_server": True, **settings})


def test_misses_faster_than_an_import_never_wait_for_one(three_models: dict[str, Path]) -> None:
    with _gateway(three_models, warm_spare=True) as srv:
        wait_for(lambda: _zygote(srv), IMPORT_WAIT, what="zygote ready")
        # Three misses at once, well inside one import time: one may take the spare (itself
        # forked), the others are forked; none is a fresh interpreter.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for out in pool.map(lambda m: _complete(srv, m), "abc"):
                assert out["choices"][0]["text"] is not None
        ps = _ps(srv)
        hot = {w["model"]: w for w in ps["workers"] if not w["spare"]}
        assert set(hot) == set("abc")
        assert {w["via"] for w in hot.values()} == {"fork"}, hot
        assert ps["zygote"]["forks"] >= 3
        gateway_pid = ps["pid"]
        for w in hot.values():
            assert psutil.Process(w["pid"]).ppid() == gateway_pid
            assert os.getpgid(w["pid"]) == w["pid"]  # its own process group
    assert not srv.orphans


def test_zygote_crash_is_survived_and_charged(three_models: dict[str, Path]) -> None:
    with _gateway({"a": three_models["a"], "b": three_models["b"]}) as srv:
        z = wait_for(lambda: _zygote(srv), IMPORT_WAIT, what="zygote ready")
        assert z["bytes"] > 0
        ps = _ps(srv)
        assert ps["used_bytes"] >= z["bytes"]  # the zygote is in the ledger
        first = _complete(srv, "a")
        worker = next(w for w in _ps(srv)["workers"] if w["model"] == "a")
        os.kill(z["pid"], signal.SIGKILL)
        wait_for(lambda: (_ps(srv)["zygote"] or {}).get("crashes", 0) >= 1, 30,
                 what="crash noticed")
        assert alive(worker["pid"])  # not the zygote's child: it keeps serving
        assert _complete(srv, "a")["choices"][0]["text"] == first["choices"][0]["text"]
        z2 = wait_for(lambda: _zygote(srv), IMPORT_WAIT, what="zygote restarted")
        assert z2["pid"] != z["pid"]
        _complete(srv, "b")
        b = next(w for w in _ps(srv)["workers"] if w["model"] == "b")
        assert b["via"] == "fork"
    assert not srv.orphans


def test_gateway_kill_9_leaves_no_zygote_or_worker(three_models: dict[str, Path]) -> None:
    srv = _gateway({"a": three_models["a"]}, warm_spare=True)
    srv.start()
    try:
        z = wait_for(lambda: _zygote(srv), IMPORT_WAIT, what="zygote ready")
        _complete(srv, "a")
        pids = [z["pid"], *(w["pid"] for w in _ps(srv)["workers"] if w["pid"])]
        assert len(pids) >= 2
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        wait_for(lambda: not any(alive(p) for p in pids), 15,
                 what=f"no orphan among {pids}")
    finally:
        srv.stop()


def test_ps_shows_estimate_learned_and_charge(three_models: dict[str, Path]) -> None:
    with _gateway({"a": three_models["a"]}, fork_server=False) as srv:
        _complete(srv, "a")
        w = next(w for w in _ps(srv)["workers"] if w["model"] == "a")
        estimate = httpx.get(srv.url + "/v1/models/a", timeout=10).json()["estimated_bytes"]
        assert w["estimated_bytes"] == estimate > 0 and w["charged_bytes"] > 0
        wait_for(lambda: httpx.get(srv.url + "/v1/models/a").json()["learned_bytes"], 10,
                 what="a learned footprint")
        httpx.post(srv.url + "/admin/models/a/unload", timeout=60)
        wait_for(lambda: not any(x["model"] == "a" for x in _ps(srv)["workers"]), 30)
        learned = httpx.get(srv.url + "/v1/models/a").json()["learned_bytes"]
        assert learned != estimate and learned >= w["memory_bytes"] > 0
        httpx.post(srv.url + "/admin/models/a/load", timeout=120)
        again = next(x for x in _ps(srv)["workers"] if x["model"] == "a")
        assert again["estimated_bytes"] == learned  # the next admission needed the learned figure
        # The new worker's own reports go on refining the figure: it is learned, not fixed.
        assert again["learned_bytes"] > 0 and again["charged_bytes"] > 0
