"""Health probes and the per-request access log, on a real gateway with fake workers."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess

KEY = "sekret"


def fake(**env: Any) -> dict[str, Any]:
    return {"path": "/nonexistent/fake", "kind": "fake",
            "env": {"FAKE_MEMORY_BYTES": "100000000", **{k: str(v) for k, v in env.items()}}}


def json_lines(srv: ServerProcess) -> list[dict[str, Any]]:
    out = []
    for line in srv.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def access_line(srv: ServerProcess, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for rec in json_lines(srv):
            if rec.get("logger") == "mlx_supervisor.access" and rec.get("request_id") == rid:
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {rid}:\n{srv.log()}")


def test_ready_is_503_until_pinned_models_load_while_health_answers_at_once() -> None:
    models = {"p": {**fake(FAKE_LOAD_SECONDS=1.5), "pinned": True}, "cold": fake()}
    with ServerProcess(models, {"warm_spare": False}) as srv:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        r = httpx.get(srv.url + "/health/ready")
        assert r.status_code == 503 and r.json() == {"status": "loading", "waiting_for": ["p"]}
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/health/ready").status_code != 200:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health/ready").json() == {"status": "ready"}
        assert httpx.get(srv.url + "/health").json()["hot_models"] == 1


def test_json_access_log_has_model_status_tokens_ttft_duration_and_request_id() -> None:
    settings = {"warm_spare": False, "log_format": "json", "api_key": KEY}
    with ServerProcess({"a": fake()}, settings) as srv:
        # Probes need no key and work with nothing loaded.
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["hot_models"] == 0
        assert httpx.get(srv.url + "/health/ready").status_code == 200  # nothing pinned

        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "a", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30,
                       headers={**auth, "x-request-id": "rid-plain-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "rid-plain-1"
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=30, headers={**auth, "x-request-id": "rid-stream-1"}) as s:
            assert s.status_code == 200
            s.read()
        r = httpx.post(srv.url + "/v1/chat/completions", json={**body, "model": "nope"}, timeout=30,
                       headers={**auth, "x-request-id": "rid-missing-1"})
        assert r.status_code == 404
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30,
                       headers={"x-request-id": "rid-nokey-1"})
        assert r.status_code == 401

        for rid in ("rid-plain-1", "rid-stream-1"):
            rec = access_line(srv, rid)
            assert rec["level"] == "info" and rec["method"] == "POST"
            assert rec["path"] == "/v1/chat/completions" and rec["http_status"] == 200
            assert rec["model"] == "a" and rec["status"] == "completed"
            assert rec["prompt_tokens"] == 2 and rec["completion_tokens"] == 5
            assert 0 < rec["ttft_ms"] <= rec["duration_ms"]
            assert rid in rec["message"]
        missing = access_line(srv, "rid-missing-1")
        assert missing["http_status"] == 404 and missing["duration_ms"] >= 0 and "model" not in missing
        assert access_line(srv, "rid-nokey-1")["http_status"] == 401
        # Probes and scrapes stay out of the log.
        assert not [rec for rec in json_lines(srv) if rec.get("path", "").startswith("/health")]
