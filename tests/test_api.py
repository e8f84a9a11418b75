"""The OpenAI API as the official client sees it, against a real gateway and real tiny models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    other = tmp_path_factory.mktemp("demo2") / "m"
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "mlx_supervisor.worker.demo.lm", str(other), "--seed", "7"],
                   check=True)
    models = {"demo": {"path": str(demo_model_dir), "aliases": ["llama", "default"]},
              "demo2": {"path": str(other)}}
    with ServerProcess(models, {"api_key": KEY, "max_body_bytes": 100_000,
                                "heartbeat_interval": 0.2}) as s:
        yield s
    assert s.orphans == []


@pytest.fixture
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(srv: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Tell me a story about a cat."}]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=MSG, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage and r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.created > 0 and r.system_fingerprint and r.model == "demo"


def test_alias_and_content_parts(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="llama", max_tokens=3, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}])
    assert r.model == "demo" and r.choices[0].message.content is not None


async def test_chat_streaming_with_usage(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(model="demo", messages=MSG, max_tokens=10, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert roles == ["assistant"] and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    full = await aclient.chat.completions.create(model="demo", messages=MSG, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == text  # streamed == non-streamed, greedy


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    r = client.completions.create(model="demo", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage and r.usage.completion_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].text
    ids = client.completions.create(model="demo", prompt=[1, 2, 3, 4], max_tokens=3, temperature=0)
    assert ids.usage and ids.usage.prompt_tokens == 4


def test_stop_strings_end_the_text_and_are_never_emitted(client: openai.OpenAI) -> None:
    base = client.completions.create(model="demo", prompt="The weather", max_tokens=24, temperature=0)
    text = base.choices[0].text
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = text[: text.index(stop)]
    r = client.completions.create(model="demo", prompt="The weather", max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt="The weather", max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut and stop not in streamed


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def once(seed: int) -> str:
        r = client.chat.completions.create(model="demo", messages=MSG, max_tokens=16, temperature=1.0,
                                           seed=seed)
        return r.choices[0].message.content or ""

    a, b = once(42), once(42)
    assert a == b
    assert any(once(s) != a for s in (1, 2, 3))


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=MSG, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content and len(lp.content) == r.usage.completion_tokens  # type: ignore[union-attr]
    first = lp.content[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 3
    assert first.top_logprobs[0].logprob >= first.top_logprobs[-1].logprob


def test_errors_are_openai_shaped(client: openai.OpenAI, srv: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MSG)
    assert "demo" in str(nf.value) and "demo2" in str(nf.value)
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="demo", messages=MSG, max_tokens="many")  # type: ignore[arg-type]
    assert br.value.body and br.value.body["param"] == "max_tokens"  # type: ignore[index]
    for bad in ({"n": 2}, {"temperature": 5}, {"max_tokens": 0}, {"max_tokens": -3}, {"top_p": 0}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="demo", messages=MSG, **bad)  # type: ignore[arg-type]
    bad_key = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(srv.url + "/v1/chat/completions", content=b"x" * 200_000, headers=h)
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h,
                   json={"model": "demo", "messages": [{"role": "user", "content": "hi " * 5000}], "max_tokens": 5})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/embeddings", headers=h, json={"model": "demo", "input": "x"})
    assert r.status_code == 400 and "lm" in r.json()["error"]["message"]


def test_models_list_the_whole_catalog(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"demo", "demo2"}
    d: Any = models["demo"]
    assert d.owned_by == "mlx-supervisor" and d.kind == "lm" and d.state in ("cold", "ready")
    assert client.models.retrieve("default").id == "demo"


async def test_two_models_answer_concurrently(aclient: openai.AsyncOpenAI) -> None:
    a, b = await asyncio.gather(*[
        aclient.chat.completions.create(model=m, messages=MSG, max_tokens=6, temperature=0)
        for m in ("demo", "demo2")])
    assert a.model == "demo" and b.model == "demo2"
    assert a.choices[0].message.content is not None and b.choices[0].message.content is not None


def test_disconnect_cancels_generation(srv: ServerProcess) -> None:
    h = {"Authorization": f"Bearer {KEY}", "x-request-id": "disconnect-me"}
    body = {"model": "demo", "messages": MSG, "max_tokens": 5000, "temperature": 0,
            "stream": True, "stop": []}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/chat/completions",
                                                 json=body, headers=h) as r:
        assert r.headers["x-request-id"] == "disconnect-me"
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    # The worker itself must stop: its own heartbeat says nothing is running any more.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        w = {x["model"]: x for x in httpx.get(srv.url + "/admin/ps", headers=h).json()["workers"]}
        if w["demo"]["inflight"] == 0 and w["demo"]["worker_inflight"] == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker kept generating: {w['demo']}")
    log = srv.log()
    assert "disconnect-me" in log


def test_request_id_is_echoed_and_logged_by_gateway_and_worker(client: openai.OpenAI, srv: ServerProcess) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MSG, max_tokens=2, extra_headers={"x-request-id": "trace-abc-123"})
    assert raw.headers["x-request-id"] == "trace-abc-123"
    time.sleep(0.3)
    lines = [ln for ln in srv.log().splitlines() if "trace-abc-123" in ln]
    assert any("mlx_supervisor.access" in ln for ln in lines), lines
    assert any("[demo pid=" in ln for ln in lines), lines  # the worker's own line
    gen = client.chat.completions.with_raw_response.create(model="demo", messages=MSG, max_tokens=1)
    assert gen.headers["x-request-id"].startswith("req-")


def test_a_request_id_already_in_flight_is_refused(srv: ServerProcess) -> None:
    h = {"Authorization": f"Bearer {KEY}", "x-request-id": "same-id-twice"}
    body = {"model": "demo", "messages": MSG, "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/chat/completions",
                                                 json=body, headers=h) as first:
        lines = first.iter_lines()
        next(lines)
        second = httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False},
                            headers=h, timeout=60)
        assert second.status_code == 409 and second.json()["error"]["code"] == "duplicate_request_id"
        rest = list(lines)
    assert "data: [DONE]" in rest  # the first one was untouched
    again = httpx.post(srv.url + "/v1/chat/completions", headers=h, timeout=60,
                       json={**body, "stream": False, "max_tokens": 2})
    assert again.status_code == 200  # free again once it finished


def test_logit_bias_outside_the_tokenizer_is_a_400(client: openai.OpenAI, demo_model_dir: Path) -> None:
    import json

    vocab = json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=MSG, max_tokens=2,
                                       logit_bias={str(vocab + 5): 100})
    assert "logit_bias" in str(e.value)
