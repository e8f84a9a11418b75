"""The quick start: ``serve --demo`` builds the demo model on first use, answers a chat with
``"model": "demo"``, shows its worker as a process, and leaves none behind on Ctrl-C."""

from __future__ import annotations

import signal

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess


def test_serve_demo_end_to_end_and_ctrl_c_leaves_no_worker() -> None:
    srv = ServerProcess({}, {"warm_spare": True}, extra_args=["--demo"], ready_timeout=120)
    with srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                       json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
        workers = srv.worker_pids()
        demo = {w["model"]: w for w in httpx.get(srv.url + "/admin/ps").json()["workers"]}["demo"]
        assert demo["pid"] in workers and demo["state"] == "ready"
        assert "mlx_supervisor.worker" in " ".join(psutil.Process(demo["pid"]).cmdline())
        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert "demo" in {m["id"] for m in models}
        rc = srv.stop(signal.SIGINT)
    assert rc == 0
    assert srv.orphans == []
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)
