"""Fair admission under thrash, against a real gateway with fake workers: three models, room
for two, equal demand from clients that never let a model go idle. Every model gets answers,
none is refused for memory, and no request waits past queue_timeout."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import chat_body, fake

MODELS = {m: {**fake(mem_mb=300, FAKE_TOKEN_DELAY=0.01), "max_concurrency": 4, "max_queue": 16}
          for m in ("a", "b", "c")}
SECONDS = 20.0
LOOPS = 4  # client loops per model
QUEUE_TIMEOUT = 30.0


async def _loop(c: httpx.AsyncClient, url: str, model: str, until: float, answers: Counter[str],
                refusals: Counter[str], waits: list[float]) -> None:
    for _ in range(10_000):  # bounded in count as well as time
        if time.monotonic() >= until:
            return
        t0 = time.monotonic()
        r = await c.post(url, json=chat_body(model, max_tokens=3))
        waits.append(time.monotonic() - t0)
        if r.status_code == 200:
            answers[model] += 1
        else:
            refusals[f"{model} {r.status_code} {r.json()['error']['code']}"] += 1
            await asyncio.sleep(0.05)


def test_three_busy_models_where_two_fit_all_get_their_turns() -> None:
    settings = {"memory_budget": "700MB", "turn_seconds": 2.0, "queue_timeout": QUEUE_TIMEOUT}
    with ServerProcess(MODELS, settings) as srv:
        answers: Counter[str] = Counter()
        refusals: Counter[str] = Counter()
        waits: list[float] = []

        async def run() -> None:
            limits = httpx.Limits(max_connections=3 * LOOPS + 4)
            async with httpx.AsyncClient(timeout=QUEUE_TIMEOUT + 30, limits=limits) as c:
                until = time.monotonic() + SECONDS
                await asyncio.wait_for(asyncio.gather(*[
                    _loop(c, srv.url + "/v1/chat/completions", m, until, answers, refusals, waits)
                    for m in MODELS for _ in range(LOOPS)]), SECONDS + QUEUE_TIMEOUT + 30)

        asyncio.run(run())
        total = sum(answers.values())
        assert total > 0, refusals
        shares = {m: answers[m] / total for m in MODELS}
        assert all(s >= 0.2 for s in shares.values()), (answers, refusals)
        assert not any("insufficient_memory" in k for k in refusals), refusals
        assert max(waits) < QUEUE_TIMEOUT + 5, max(waits)
        used = httpx.get(srv.url + "/admin/ps", timeout=10).json()
        assert used["used_bytes"] <= used["budget_bytes"]
        assert "Traceback" not in srv.log()
    assert srv.orphans == []


def test_a_request_waiting_for_a_turn_times_out_with_the_expected_wait_as_retry_after() -> None:
    """One model streams (busy) and holds the memory; another waits for its turn, which comes
    after turn_seconds (30): at queue_timeout (3 s) it gets 503 with Retry-After near the rest
    of that turn, not a fixed guess, and no insufficient_memory."""
    models = {"busy": fake(mem_mb=300, FAKE_TOKEN_DELAY=0.05), "other": fake(mem_mb=300)}
    settings = {"memory_budget": "400MB", "turn_seconds": 30.0, "queue_timeout": 3.0}
    with ServerProcess(models, settings) as srv:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json=chat_body("busy", max_tokens=2000, stream=True)) as s:
            lines = s.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("other"), timeout=30)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_timeout" and "held by busy models" in err["message"], err
        assert 15 <= int(r.headers["retry-after"]) <= 35, r.headers
    assert srv.orphans == []
