"""``/metrics`` after a scripted life (load, serve, evict, crash, ttl, refusal) on a real gateway
with fake workers (real processes, no MLX): every counter lands on the value the script implies."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.observe.metrics import attach, crash_reason
from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for
from mlx_supervisor.shared.config import Config

MB = 10**6
# No warm spare: it would add a process to every count and slow a 2-core machine down.
SETTINGS: dict[str, Any] = {"memory_budget": "250MB", "warm_spare": False}


def fake(mem_mb: int = 100, **extra: Any) -> dict[str, Any]:
    env = {k: str(v) for k, v in extra.pop("env", {}).items()}
    return {"path": "/nonexistent/fake", "kind": "fake",
            "env": {"FAKE_MEMORY_BYTES": str(mem_mb * MB), **env}, **extra}


def scrape(srv: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics keyed by (name, labels)."""
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def val(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def hot(srv: ServerProcess) -> dict[str, dict[str, Any]]:
    return {w["model"]: w for w in httpx.get(srv.url + "/admin/ps", timeout=10).json()["workers"]}


def chat(srv: ServerProcess, model: str, max_tokens: int = 5, stream: bool = False) -> Any:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=max_tokens, stream=stream)
    return list(r) if stream else r



def test_counters_after_load_serve_evict_crash_ttl_and_refusal() -> None:
    models = {"a": fake(), "b": fake(), "c": fake(), "t": fake(ttl=0.5), "huge": fake(mem_mb=10_000)}
    with ServerProcess(models, SETTINGS) as srv:
        assert httpx.post(srv.url + "/admin/models/a/load", timeout=30).status_code == 200
        chat(srv, "a")
        chat(srv, "a", stream=True)
        chat(srv, "b")
        chat(srv, "c")  # a is least recently used: evicted
        wait_for(lambda: set(hot(srv)) == {"b", "c"})
        os.kill(hot(srv)["b"]["pid"], signal.SIGKILL)
        wait_for(lambda: set(hot(srv)) == {"c"})
        r = httpx.post(srv.url + "/v1/completions",
                       json={"model": "c", "prompt": "one two three", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        chat(srv, "t")
        wait_for(lambda: "t" not in hot(srv), timeout=5)  # ttl 0.5 s
        try:
            chat(srv, "huge")
            raise AssertionError("a model over the whole budget was admitted")
        except openai.APIStatusError as e:
            assert e.status_code == 503
        m = scrape(srv)

    for model in ("a", "b", "c", "t"):
        assert val(m, "mlx_supervisor_worker_spawns_total", model=model) == 1, model
        assert val(m, "mlx_supervisor_model_loads_total", model=model) == 1, model
    assert val(m, "mlx_supervisor_model_load_duration_seconds_count", model="a") == 1
    assert val(m, "mlx_supervisor_evictions_total", model="a") == 1
    assert sum(v for (n, _), v in m.items() if n == "mlx_supervisor_evictions_total") == 1
    assert val(m, "mlx_supervisor_worker_stops_total", model="a") == 1
    assert val(m, "mlx_supervisor_worker_stops_total", model="t") == 1
    assert val(m, "mlx_supervisor_worker_crashes_total", model="b", reason="sigkill") == 1
    assert sum(v for (n, _), v in m.items() if n == "mlx_supervisor_worker_crashes_total") == 1
    assert val(m, "mlx_supervisor_ttl_unloads_total", model="t") == 1

    assert val(m, "mlx_supervisor_requests_total", model="a", route="chat", status="completed") == 2
    assert val(m, "mlx_supervisor_requests_total", model="b", route="chat", status="completed") == 1
    assert val(m, "mlx_supervisor_requests_total", model="c", route="completions", status="completed") == 1
    assert val(m, "mlx_supervisor_requests_total", model="huge", route="chat", status="failed") == 1
    # The fake answers exactly max_tokens tokens and counts prompt words: "hello there" is 2.
    assert val(m, "mlx_supervisor_generated_tokens_total", model="a") == 10
    assert val(m, "mlx_supervisor_prompt_tokens_total", model="a") == 4
    assert val(m, "mlx_supervisor_prompt_tokens_total", model="c") == 5  # 2 chat + 3 completion words
    assert val(m, "mlx_supervisor_time_to_first_token_seconds_count", model="a") == 2
    assert val(m, "mlx_supervisor_request_duration_seconds_count", model="a") == 2
    assert val(m, "mlx_supervisor_tokens_per_second_count", model="a") == 2
    assert val(m, "mlx_supervisor_request_duration_seconds_count", model="huge") == 0  # never ran
    assert val(m, "mlx_supervisor_queue_wait_seconds_count", model="a") == 2

    # Levels at scrape time: only c is hot.
    assert val(m, "mlx_supervisor_memory_budget_bytes") == 250 * MB
    assert val(m, "mlx_supervisor_memory_used_bytes") == 100 * MB
    assert val(m, "mlx_supervisor_hot_workers") == 1
    assert val(m, "mlx_supervisor_workers", model="c", state="ready") == 1
    assert val(m, "mlx_supervisor_worker_memory_bytes", model="c") == 100 * MB
    assert val(m, "mlx_supervisor_inflight_requests", model="c") == 0
    assert val(m, "mlx_supervisor_queued_requests", model="a") == 0
    assert val(m, "mlx_supervisor_gateway_process_resident_memory_bytes") > 0


def test_inflight_and_queue_depth_are_live() -> None:
    models = {"slow": fake(max_concurrency=1, env={"FAKE_TOKEN_DELAY": 0.05})}
    with ServerProcess(models, SETTINGS) as srv:
        chat(srv, "slow", max_tokens=1)
        threads = [threading.Thread(target=chat, args=(srv, "slow", 20)) for _ in range(2)]
        for t in threads:
            t.start()
        m = wait_for(lambda: (s := scrape(srv))
                     and val(s, "mlx_supervisor_queued_requests", model="slow") == 1 and s)
        assert val(m, "mlx_supervisor_inflight_requests", model="slow") == 1
        for t in threads:
            t.join()
        m = scrape(srv)
        assert val(m, "mlx_supervisor_inflight_requests", model="slow") == 0
        assert val(m, "mlx_supervisor_queued_requests", model="slow") == 0
        assert val(m, "mlx_supervisor_requests_total", model="slow", route="chat", status="completed") == 3
        # The queued request waited about a whole answer (20 tokens x 50 ms) for its slot.
        assert val(m, "mlx_supervisor_queue_wait_seconds_sum", model="slow") > 0.5


async def test_each_gateway_has_its_own_registry(tmp_path: Path) -> None:
    gws = [Gateway.build(Config(), {}, {}, 100 * MB, f"ipc://{tmp_path}/gw{i}.sock")
           for i in range(2)]
    try:
        metrics = [attach(gw) for gw in gws]
        metrics[0].requests.labels("m", "chat", "completed").inc()
        assert "mlx_supervisor_requests_total" in prometheus_client.generate_latest(metrics[0].registry).decode()
        assert 'model="m"' not in prometheus_client.generate_latest(metrics[1].registry).decode()
        assert b"mlx_supervisor" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)
    finally:
        for gw in gws:
            await gw.sup.transport.close()


def test_crash_reasons_are_a_small_closed_set() -> None:
    assert crash_reason("killed by SIGKILL: perhaps out of memory?", -9) == "sigkill"
    assert crash_reason("missed heartbeats for 5.1s (hung?)", -9) == "hung"
    assert crash_reason("load failed: no such file", 3) == "load_failed"
    assert crash_reason("did not load within load_timeout (60s)", -9) == "load_timeout"
    assert crash_reason("exited with code 1", 1) == "exit"
