"""The supervisor through a real gateway: LRU under a budget, pinning, busy workers, single
flight, crashes, hangs and TTL. Fast fake workers (real processes, no MLX) keep timing honest."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for
from mlx_supervisor.gateway.testing.server import alive as _alive
from mlx_supervisor.gateway.testing.server import fake_model as fake

MB = 10**6



def ps(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(srv.url + "/admin/ps", timeout=10)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def hot(srv: ServerProcess) -> dict[str, dict[str, Any]]:
    return {w["model"]: w for w in ps(srv)["workers"]}


def chat(srv: ServerProcess, model: str, content: str = "hello there", **kw: Any) -> Any:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=kw.pop("max_tokens", 5), **kw)



class LedgerSampler:
    """Samples /admin/ps in the background; the ledger must never exceed the budget."""

    def __init__(self, srv: ServerProcess):
        self.srv, self.samples, self._stop = srv, [], threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                d = c.get(self.srv.url + "/admin/ps").json()
                self.samples.append((d["used_bytes"], d["budget_bytes"]))
                time.sleep(0.01)

    def __enter__(self) -> LedgerSampler:
        self.t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self.t.join()


def test_lru_eviction_keeps_the_two_most_recent_within_budget() -> None:
    models = {"a": fake(), "b": fake(), "c": fake()}
    with ServerProcess(models, {"memory_budget": "250MB"}) as srv, LedgerSampler(srv) as sampler:
        for m in ("a", "b"):
            assert chat(srv, m).choices[0].message.content
        pid_a = hot(srv)["a"]["pid"]
        assert chat(srv, "c").choices[0].message.content
        wait_for(lambda: set(hot(srv)) == {"b", "c"})
        wait_for(lambda: not _alive(pid_a))
        # Touch b, then a comes back and c (now least recent) goes.
        chat(srv, "b")
        chat(srv, "a")
        wait_for(lambda: set(hot(srv)) == {"a", "b"})
    assert len(sampler.samples) > 20
    assert all(used <= budget for used, budget in sampler.samples), max(sampler.samples)
    assert srv.orphans == []


def test_pinned_survives_and_busy_is_never_evicted_and_oversize_is_refused() -> None:
    models = {"pinned": {**fake(), "pinned": True}, "slow": fake(FAKE_TOKEN_DELAY=0.05),
              "x": fake(), "huge": fake(mem_mb=10_000), "past_pinned": fake(mem_mb=200)}
    with ServerProcess(models, {"memory_budget": "250MB"}) as srv:
        wait_for(lambda: hot(srv).get("pinned", {}).get("state") == "ready")
        assert httpx.get(srv.url + "/health/ready").status_code == 200
        pinned_pid = hot(srv)["pinned"]["pid"]
        # slow is busy streaming for ~2.5 s; x needs room, but pinned can never go and busy
        # keeps its memory for its turn: x waits (no 503) and gets slow's memory once it is idle.
        result: dict[str, Any] = {}

        def long_request() -> None:
            result["r"] = chat(srv, "slow", max_tokens=50)

        t = threading.Thread(target=long_request)
        t.start()
        wait_for(lambda: hot(srv).get("slow", {}).get("inflight") == 1)
        assert chat(srv, "x").choices[0].finish_reason == "length"
        t.join()
        assert result["r"].choices[0].finish_reason == "length"
        # Now slow is idle: x evicts it, never the pinned one.
        chat(srv, "x")
        assert set(hot(srv)) == {"pinned", "x"} or wait_for(lambda: set(hot(srv)) == {"pinned", "x"})
        assert hot(srv)["pinned"]["pid"] == pinned_pid
        with pytest.raises(openai.APIStatusError) as e:
            chat(srv, "huge")
        assert e.value.status_code == 503 and "more than the whole memory budget" in str(e.value)
        with pytest.raises(openai.APIStatusError) as e:  # fits the budget, never beside pinned
            chat(srv, "past_pinned")
        assert e.value.status_code == 503 and "pinned models leave too little" in str(e.value)


def test_twenty_concurrent_requests_to_a_cold_model_share_one_spawn() -> None:
    with ServerProcess({"m": fake(FAKE_LOAD_SECONDS=1.0)}) as srv:
        async def go() -> list[Any]:
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            return await asyncio.gather(*[
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"q{i}"}],
                                               max_tokens=3) for i in range(20)])

        answers = asyncio.run(go())
        assert len(answers) == 20 and all(a.choices[0].message.content for a in answers)
        info = httpx.get(srv.url + "/v1/models/m").json()
        assert info["loads"] == 1 and info["state"] == "ready"


def test_kill_9_mid_stream_fails_that_stream_only_and_respawns() -> None:
    models = {"victim": fake(FAKE_TOKEN_DELAY=0.02), "other": fake(FAKE_TOKEN_DELAY=0.02)}
    with ServerProcess(models) as srv:
        chat(srv, "victim")
        chat(srv, "other")
        pid = hot(srv)["victim"]["pid"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        other_result: dict[str, Any] = {}

        def other() -> None:
            other_result["r"] = chat(srv, "other", max_tokens=100)

        t = threading.Thread(target=other)
        t.start()
        stream = client.chat.completions.create(
            model="victim", messages=[{"role": "user", "content": "go"}], max_tokens=1000, stream=True)
        got = 0
        with pytest.raises(openai.APIError) as e:
            for _chunk in stream:
                got += 1
                if got == 5:
                    os.kill(pid, signal.SIGKILL)
        assert "victim" in str(e.value) and "SIGKILL" in str(e.value)
        t.join()
        assert other_result["r"].choices[0].finish_reason == "length"
        r = chat(srv, "victim")
        assert r.choices[0].message.content
        assert hot(srv)["victim"]["pid"] != pid
        # The respawn's Ready cleared last_error; the crash and its cause stay counted.
        crashes = {tuple(sorted(s.labels.items())): s.value
                   for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
                   for s in fam.samples if s.name == "mlx_supervisor_worker_crashes_total"}
        assert crashes == {(("model", "victim"), ("reason", "sigkill")): 1.0}, crashes


def test_a_hung_worker_is_killed_and_replaced() -> None:
    with ServerProcess({"h": fake(FAKE_HANG_WORD="HANG")},
                       {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}) as srv:
        chat(srv, "h")
        pid = hot(srv)["h"]["pid"]
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            chat(srv, "h", content="please HANG now")
        assert e.value.status_code == 503 and "heartbeat" in str(e.value)
        assert time.monotonic() - t0 < 6
        wait_for(lambda: not _alive(pid))
        assert chat(srv, "h").choices[0].message.content
        assert hot(srv)["h"]["pid"] != pid


def test_ttl_unloads_within_a_second_of_expiry() -> None:
    with ServerProcess({"t": {**fake(), "ttl": 1.0}, "forever": {**fake(), "ttl": 0}}) as srv:
        chat(srv, "forever")
        chat(srv, "t")
        t_last = time.monotonic()
        pid = hot(srv)["t"]["pid"]
        assert hot(srv)["t"]["ttl_remaining"] is not None
        wait_for(lambda: hot(srv).get("t", {}).get("state") != "ready", timeout=5, step=0.02)
        elapsed = time.monotonic() - t_last
        assert 0.9 <= elapsed < 2.0, elapsed  # the server clock starts a hair before ours
        wait_for(lambda: not _alive(pid))
        assert hot(srv)["forever"]["state"] == "ready"


def test_repeated_load_crashes_mark_the_model_failed_with_stderr() -> None:
    with ServerProcess({"bad": fake(FAKE_CRASH_AT_LOAD=1), "good": fake()},
                       {"max_crashes": 2}) as srv:
        for _ in range(2):
            with pytest.raises(openai.APIStatusError) as e:
                chat(srv, "bad")
            assert e.value.status_code == 503
        # The client gets the concise cause; the stderr tail is the operator's (/admin/ps).
        assert "crashing at load" in str(e.value) and "last stderr" not in str(e.value)
        ps = httpx.get(srv.url + "/admin/ps").json()
        assert "last stderr" in ps["last_errors"]["bad"], ps["last_errors"]
        with pytest.raises(openai.APIStatusError) as e:
            chat(srv, "bad")
        assert e.value.status_code == 503 and "backing off" in str(e.value)
        assert e.value.response.headers.get("retry-after")
        info = httpx.get(srv.url + "/v1/models/bad").json()
        assert info["state"] == "failed" and info["last_error"]
        assert chat(srv, "good").choices[0].message.content  # other models untouched


def test_admin_load_pin_and_unload() -> None:
    with ServerProcess({"a": fake(), "b": fake()}, {"memory_budget": "150MB"}) as srv:
        r = httpx.post(srv.url + "/admin/models/a/load", json={"pin": True}, timeout=30)
        assert r.status_code == 200 and r.json()["pinned"] is True and r.json()["pid"]
        with pytest.raises(openai.APIStatusError):
            chat(srv, "b")  # a is pinned and the budget fits one
        r = httpx.post(srv.url + "/admin/models/a/unload", timeout=30)
        assert r.status_code == 200
        assert "a" not in hot(srv)
        assert chat(srv, "b").choices[0].message.content
        snap = ps(srv)
        assert snap["budget_bytes"] == 150 * MB and snap["used_bytes"] > 0


def test_a_worker_that_cannot_even_be_spawned_fails_fast_every_time() -> None:
    # An environment too large for execve (E2BIG): the spawn itself fails, with no process.
    models = {"unspawnable": fake(HUGE="x" * 300_000), "ok": fake()}
    with ServerProcess(models, {"queue_timeout": 30, "max_crashes": 5}) as srv:
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as e:
                chat(srv, "unspawnable")
            assert e.value.status_code == 503 and "could not start worker" in str(e.value)
            assert time.monotonic() - t0 < 10  # never a wait for queue_timeout
        assert chat(srv, "ok").choices[0].message.content


def test_unload_during_a_load_tells_the_loader_and_leaves_the_model_cold() -> None:
    with ServerProcess({"slow": fake(FAKE_LOAD_SECONDS=3)}) as srv:
        result: dict[str, Any] = {}

        def load() -> None:
            result["r"] = httpx.post(srv.url + "/admin/models/slow/load", timeout=30)

        t = threading.Thread(target=load)
        t.start()
        wait_for(lambda: hot(srv).get("slow"))
        assert httpx.post(srv.url + "/admin/models/slow/unload", timeout=30).status_code == 200
        t.join()
        assert result["r"].status_code == 503 and "unloaded" in result["r"].text
        time.sleep(0.5)
        assert "slow" not in hot(srv)


def test_a_loading_worker_is_charged_at_least_its_estimate() -> None:
    from mlx_supervisor.gateway.supervisor.model import Worker
    from mlx_supervisor.gateway.supervisor.states import State
    from mlx_supervisor.shared.protocol import Memory

    w = Worker(model_id="m", worker_id="m#1", estimate=1000, kind="lm", state=State.LOADING,
               memory=Memory(active=10, rss=20))
    assert w.bytes == 1000  # a partial load must not free the room it is about to need
    w.state = State.READY
    assert w.bytes == 20  # once ready, the measurement replaces the estimate
