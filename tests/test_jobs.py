"""The request ledger through a real ``mlx-supervisor serve`` with fake workers: row lifecycle,
cancel by id, worker and gateway crashes, a corrupt ledger file, 200 concurrent requests, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_supervisor.gateway import cli
from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for

ADMIN = {"authorization": "Bearer adm"}


def fake(delay: float = 0.01, **kw: Any) -> dict[str, Any]:
    return {"path": "/nonexistent/fake", "kind": "fake", "env": {"FAKE_TOKEN_DELAY": str(delay)}, **kw}


def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def stream(srv: ServerProcess, rid: str, max_tokens: int) -> Any:
    return client(srv).chat.completions.create(
        model="f", messages=[{"role": "user", "content": "one two three"}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, extra_headers={"x-request-id": rid})


def job(srv: ServerProcess, rid: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/jobs/{rid}", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def status(srv: ServerProcess, rid: str, headers: dict[str, str] | None = None) -> str | None:
    """The job's status, None while the request has not reached the gateway yet."""
    r = httpx.get(f"{srv.url}/v1/jobs/{rid}", headers=headers, timeout=10)
    return None if r.status_code == 404 else str(r.json()["status"])



def consume(s: Any, out: dict[str, Any]) -> None:
    """Read a stream to its end in a thread; keep the usage chunk or the error."""
    try:
        for chunk in s:
            if chunk.usage is not None:
                out["usage"] = chunk.usage
    except (openai.APIError, httpx.HTTPError) as e:
        out["error"] = e


def start_stream(srv: ServerProcess, rid: str, max_tokens: int) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            consume(stream(srv, rid, max_tokens), out)
        except (openai.APIError, httpx.HTTPError) as e:  # refused before the stream began
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_streamed_row_goes_queued_processing_completed(capsys: pytest.CaptureFixture[str]) -> None:
    with ServerProcess({"f": fake(0.02, max_concurrency=1)}, {"admin_key": "adm"}) as srv:
        assert httpx.get(srv.url + "/v1/jobs/x").status_code == 401  # operator routes take the key
        first, _ = start_stream(srv, "a", 60)
        wait_for(lambda: status(srv, "a", ADMIN) == "processing")
        seen: list[str] = []
        second, out = start_stream(srv, "b", 20)
        while second.is_alive() or not seen or seen[-1] != "completed":
            s = httpx.get(srv.url + "/v1/jobs/b", headers=ADMIN).json().get("status")
            if s and (not seen or seen[-1] != s):
                seen.append(s)
            if s == "queued" and "stats" not in out:
                out["stats"] = httpx.get(srv.url + "/v1/queue/stats", headers=ADMIN).json()
            time.sleep(0.005)
        first.join(10)
        assert seen == ["queued", "processing", "completed"]
        stats = out["stats"]["models"][0]
        assert (stats["model"], stats["queued"], stats["in_flight"]) == ("f", 1, 1)
        assert (stats["max_concurrency"], stats["oldest_wait_seconds"] > 0) == (1, True)
        row = job(srv, "b", ADMIN)
        usage = out["usage"]
        assert row["usage"]["prompt_tokens"] == usage.prompt_tokens == 3
        assert row["usage"]["completion_tokens"] == usage.completion_tokens == 20
        assert row["client"] == "127.0.0.1" and row["pid"] and row["finish_reason"] == "length"
        assert row["received_at"] <= row["started_at"] <= row["first_token_at"] <= row["finished_at"]
        assert row["queue_seconds"] > 0.05  # it waited for "a"

        base = ["--config", str(srv.config)]
        assert cli.main([*base, "jobs", "--json", "--status", "completed", "--model", "f"]) == 0
        assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["b", "a"]
        assert cli.main([*base, "jobs", "--limit", "1"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:3] == ["ID", "MODEL", "STATUS"] and table[1].split()[:3] == ["b", "f", "completed"]
        assert cli.main([*base, "cancel", "a"]) == 1
        assert "already finished (completed)" in capsys.readouterr().err


def test_cancel_by_id_running_and_queued() -> None:
    with ServerProcess({"f": fake(0.02, max_concurrency=1)}) as srv:
        s = stream(srv, "run1", 1000)
        it = iter(s)
        next(it)
        queued, qout = start_stream(srv, "q1", 5)
        wait_for(lambda: status(srv, "q1") == "queued")

        r = httpx.delete(srv.url + "/v1/jobs/q1", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        queued.join(10)
        assert "cancelled" in str(qout["error"])

        r = httpx.delete(srv.url + "/v1/jobs/run1", timeout=10)
        assert r.status_code == 200, r.text
        with pytest.raises(openai.APIError, match="run1 was cancelled"):
            for _ in it:
                pass
        row = job(srv, "run1")
        assert row["status"] == "cancelled" and row["error"]["type"] == "cancelled"
        assert row["usage"]["completion_tokens"] < 1000
        # The worker itself stopped generating (its heartbeat says nothing runs), not just the stream.
        wait_for(lambda: httpx.get(srv.url + "/admin/ps").json()["workers"][0]["worker_inflight"] == 0, 3)

        for rid, http_status, code in (("nope", 404, "job_not_found"), ("run1", 409, "job_finished")):
            r = httpx.delete(f"{srv.url}/v1/jobs/{rid}")
            assert r.status_code == http_status and r.json()["error"]["code"] == code


NON_STREAMED = {  # route: (its body, the cancel: method and path)
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "one two"}], "max_tokens": 1000},
                             ("DELETE", "/v1/jobs/{rid}")),
    "/v1/messages": ({"messages": [{"role": "user", "content": "one two"}], "max_tokens": 1000},
                     ("DELETE", "/v1/jobs/{rid}")),
    "/v1/responses": ({"input": "one two", "max_output_tokens": 1000},
                      ("POST", "/v1/responses/resp_{rid}/cancel")),
}


@pytest.mark.parametrize("route", list(NON_STREAMED))
def test_cancelled_non_streamed_request_gets_a_499_in_its_apis_shape(route: str) -> None:
    body, (method, cancel) = NON_STREAMED[route]
    rid = "ns-" + route.rsplit("/", 1)[-1]
    with ServerProcess({"f": fake(0.02)}) as srv:
        out: dict[str, Any] = {}

        def call() -> None:
            out["r"] = httpx.post(srv.url + route, json={"model": "f", **body},
                                  headers={"x-request-id": rid}, timeout=30)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        wait_for(lambda: status(srv, rid) == "processing")
        r = httpx.request(method, srv.url + cancel.format(rid=rid), timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        t.join(10)
        resp = out["r"]
        assert resp.status_code == 499, resp.text
        err = resp.json()
        if route == "/v1/messages":
            assert err["type"] == "error" and f"{rid} was cancelled" in err["error"]["message"]
        else:
            assert err["error"]["code"] == "cancelled" and f"{rid} was cancelled" in err["error"]["message"]
        assert job(srv, rid)["status"] == "cancelled"


def test_worker_kill9_leaves_the_row_failed_with_the_reason() -> None:
    with ServerProcess({"f": fake(0.02)}) as srv:
        it = iter(stream(srv, "k1", 1000))
        next(it)
        os.kill(job(srv, "k1")["pid"], signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in it:
                pass
        row = wait_for(lambda: (j := job(srv, "k1"))["status"] != "processing" and j)
        assert row["status"] == "failed"
        assert row["error"]["type"] == "worker_crashed" and "SIGKILL" in row["error"]["message"]


def test_gateway_kill9_then_restart_leaves_nothing_processing(tmp_path: Path) -> None:
    settings = {"ledger": {"path": str(tmp_path / "ledger.sqlite3")}}
    models = {"f": fake(0.02, max_concurrency=1)}
    srv = ServerProcess(models, settings).start()
    try:
        start_stream(srv, "g1", 1000)
        wait_for(lambda: status(srv, "g1") == "processing")
        start_stream(srv, "g2", 5)
        wait_for(lambda: status(srv, "g2") == "queued")  # read after write: on disk now
        assert srv.proc is not None
        srv.proc.kill()
    finally:
        srv.stop()
    with ServerProcess(models, settings) as again:
        r = httpx.get(again.url + "/v1/jobs", params={"status": "queued,processing"}).json()
        assert r["data"] == []
        for rid in ("g1", "g2"):
            row = job(again, rid)
            assert row["status"] == "failed" and row["error"]["type"] == "gateway_restart"


def test_corrupt_ledger_is_a_warning_and_traffic_still_flows(tmp_path: Path) -> None:
    bad = tmp_path / "ledger.sqlite3"
    bad.write_bytes(b"\x00garbage, not sqlite\xff" * 500)
    with ServerProcess({"f": fake(0.0)}, {"ledger": {"path": str(bad)}}) as srv:
        health = httpx.get(srv.url + "/health").json()
        assert any("ledger" in w and "cannot be used" in w for w in health["warnings"]), health
        reply = client(srv).chat.completions.create(
            model="f", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens == 3
        r = httpx.get(srv.url + "/v1/jobs")
        assert r.status_code == 503 and r.json()["error"]["code"] == "ledger_disabled"
        assert httpx.delete(srv.url + "/v1/jobs/nope").status_code == 404


def test_200_concurrent_requests_leave_200_rows() -> None:
    async def burst(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            async def one(i: int) -> str:
                r = await c.post("/v1/completions", json={"model": "f", "prompt": "a b", "max_tokens": 3},
                                 headers={"x-request-id": f"c{i:03d}"})
                assert r.status_code == 200, r.text
                return r.headers["x-request-id"]
            return await asyncio.gather(*(one(i) for i in range(200)))

    with ServerProcess({"f": fake(0.0, max_concurrency=50, max_queue=200)}) as srv:
        sent = asyncio.run(burst(srv.url))
        got: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = httpx.get(srv.url + "/v1/jobs", params={"limit": 75, **({"after": cursor} if cursor else {})}).json()
            got += page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert sorted(j["id"] for j in got) == sorted(sent)
        assert {j["status"] for j in got} == {"completed"}
        assert all(j["usage"]["completion_tokens"] == 3 for j in got)
