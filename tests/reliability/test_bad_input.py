"""Hostile input against one long-lived gateway with real workers (tiny llama, MiniLM) and a fake
one: every bad request is a 4xx in OpenAI's error shape, never a 500, never a dead worker, and a
model id that looks like a path never reaches the file system."""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import AUDIT_HOOK, PROBE, TINY_CONTEXT, chat_body, hot, log_size, ps

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
MODELS = ("tiny", "emb", "fake")


@pytest.fixture(scope="module")
def http(real_srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_srv.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def baseline(real_srv: ServerProcess, http: httpx.Client) -> dict[str, int]:
    """Worker pids once every model is loaded; no bad input may change them."""
    for m in MODELS:
        http.post(f"/admin/models/{m}/load").raise_for_status()
    return {m: w["pid"] for m, w in hot(real_srv).items()}


def _assert_clean_refusal(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    for w in words:
        assert w in err["message"], (w, err)
    return err


# ---------------------------------------------------------------- a table of known bad requests

BAD: list[tuple[str, str, bytes | dict[str, Any] | list[Any], int, tuple[str, ...]]] = [
    ("malformed JSON", CHAT, b'{"model": "fake", "messages": [', 400, ("not valid JSON",)),
    ("not an object", CHAT, [1, 2, 3], 400, ()),
    ("empty body", COMPLETIONS, b"", 400, ()),
    ("null body", EMBEDDINGS, b"null", 400, ()),
    ("model not a string", CHAT, {"model": 7, "messages": []}, 400, ("model",)),
    ("messages a string", CHAT, {"model": "fake", "messages": "hi"}, 400, ("messages",)),
    ("max_tokens a string", CHAT, {**chat_body("fake"), "max_tokens": "many"}, 400, ("max_tokens",)),
    ("stream not a bool", CHAT, chat_body("fake", stream="yes"), 400, ("stream",)),
    ("temperature NaN", COMPLETIONS, b'{"model":"fake","prompt":"x","temperature":NaN}', 400, ()),
    ("negative max_tokens", CHAT, chat_body("tiny", max_tokens=-1), 400, ("max_tokens",)),
    ("zero max_tokens", COMPLETIONS, {"model": "fake", "prompt": "x", "max_tokens": 0}, 400, ("max_tokens",)),
    ("absurd max_tokens", CHAT, chat_body("tiny", max_tokens=10**30), 400, ("max_tokens",)),
    ("max_tokens over the cap", CHAT, chat_body("fake", max_tokens=2**20 + 1), 400, ("max_tokens",)),
    ("float max_tokens", CHAT, {**chat_body("fake"), "max_tokens": 1e9}, 400, ("max_tokens",)),
    ("huge token id", COMPLETIONS, {"model": "tiny", "prompt": [2**70]}, 400, ("prompt",)),
    ("negative token id", COMPLETIONS, {"model": "tiny", "prompt": [-5]}, 400, ("prompt",)),
    ("token id past the vocab", COMPLETIONS, {"model": "tiny", "prompt": [1, 99999]}, 400, ("prompt_ids",)),
    ("huge embedding token id", EMBEDDINGS, {"model": "emb", "input": [[1, 2**70]]}, 400, ("input",)),
    ("huge top_k", CHAT, chat_body("tiny", top_k=2**70), 400, ("top_k",)),
    ("huge logit_bias id", CHAT, chat_body("tiny", logit_bias={str(2**70): 1}), 400, ("logit_bias",)),
    ("huge dimensions", EMBEDDINGS, {"model": "emb", "input": "x", "dimensions": 2**70}, 400, ("dimensions",)),
    ("bad role", CHAT, {"model": "tiny", "messages": [{"role": "root", "content": "x"}]}, 400, ("role",)),
    ("n = 3", CHAT, chat_body("fake", n=3), 400, ("n = 1",)),
    ("too many stops", CHAT, chat_body("fake", stop=["a"] * 17), 400, ("stop",)),
    ("top_logprobs 99", CHAT, chat_body("tiny", logprobs=True, top_logprobs=99), 400, ("top_logprobs",)),
    ("logit_bias key", CHAT, chat_body("tiny", logit_bias={"x": 1}), 400, ("logit_bias",)),
    ("embeddings on an lm", EMBEDDINGS, {"model": "tiny", "input": "x"}, 400, ("embeddings",)),
    ("chat on embeddings", CHAT, chat_body("emb"), 400, ("embeddings",)),
    ("empty input", EMBEDDINGS, {"model": "emb", "input": []}, 400, ("input",)),
    ("mixed input", EMBEDDINGS, {"model": "emb", "input": ["a", 1]}, 400, ()),
    ("unknown model", CHAT, chat_body("gpt-5"), 404, ("does not exist", "tiny", "fake")),
    ("deep nesting", CHAT, b'{"model": "fake", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, ()),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_a_clean_4xx(http: httpx.Client, path: str, body: Any, status: int,
                                    words: tuple[str, ...]) -> None:
    r = http.post(path, content=body if isinstance(body, bytes) else json.dumps(body).encode(),
                  headers={"content-type": "application/json"})
    _assert_clean_refusal(r, status, *words)


def test_invalid_utf8_bodies(http: httpx.Client) -> None:
    bodies = [b'{"model": "fake", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
              b'{"model": "fake\xc3", "prompt": "x"}',
              b'{"model": "tiny", "prompt": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate
              b'{"model": "tiny", "prompt": "\\ud800"}',  # a lone surrogate escape
              b'{"model": "emb", "input": ["\\udfff x"]}']
    for body in bodies:
        for path in (CHAT, COMPLETIONS, EMBEDDINGS):
            r = http.post(path, content=body)
            assert r.status_code in (400, 404), (path, body, r.status_code, r.text[:300])
            _assert_clean_refusal(r, r.status_code)


def test_huge_bodies_are_413_declared_or_chunked(http: httpx.Client) -> None:
    big = json.dumps(chat_body("fake", "word " * 30_000)).encode()  # ~150 kB > 100 kB
    _assert_clean_refusal(http.post(CHAT, content=big), 413, "max_body_bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    _assert_clean_refusal(http.post(COMPLETIONS, content=chunks()), 413, "max_body_bytes")
    # A declared length over the limit is refused before the body is read (none is sent here).
    host, port = str(http.base_url.host), int(http.base_url.port or 80)
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999999\r\n\r\n{")
        head = s.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head[:300]


@pytest.mark.parametrize("model", ["tiny", "fake"])
def test_prompt_longer_than_context_is_400_with_the_numbers(http: httpx.Client, model: str) -> None:
    ctx = TINY_CONTEXT if model == "tiny" else 4096
    r = http.post(COMPLETIONS, json={"model": model, "prompt": "hello " * (ctx + 50), "max_tokens": 5})
    err = _assert_clean_refusal(r, 400, str(ctx), "context length")
    assert err["code"] == "context_length_exceeded"
    r = http.post(CHAT, json=chat_body(model, "hello " * (ctx + 50)))
    _assert_clean_refusal(r, 400, str(ctx))


PATHS = ["../../etc/passwd", "/etc", "~root", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd",
         "../" * 8 + "etc/passwd", "~root/.ssh/id_rsa", "/root"]


def test_path_like_model_ids_are_404_and_never_touch_the_file_system(
        real_srv: ServerProcess, http: httpx.Client, audit_log: Path, tmp_path: Path) -> None:
    """Ids that look like paths (including one naming a real model directory) are 404 on every
    route; no worker is spawned and the gateway's audit hook sees no file access for them."""
    probe = tmp_path / PROBE
    probe.mkdir()
    (probe / "config.json").write_text('{"model_type": "llama"}')
    ids = [*PATHS, str(probe), f"../../../../../../..{probe}", "file://" + str(probe)]
    gw_pid = real_srv.proc.pid if real_srv.proc else -1

    def gateway_events() -> list[str]:
        lines = audit_log.read_text().splitlines() if audit_log.exists() else []
        return [ln for ln in lines if ln.split(" ", 1)[0] == str(gw_pid)]

    before, workers = gateway_events(), hot(real_srv)
    for mid in ids:
        for path, body in ((CHAT, chat_body(mid)), (COMPLETIONS, {"model": mid, "prompt": "x"}),
                           (EMBEDDINGS, {"model": mid, "input": "x"})):
            _assert_clean_refusal(http.post(path, json=body), 404, "does not exist")
        for url in (f"/v1/models/{mid}", f"/v1/models/{mid.lstrip('/')}"):
            assert http.get(url).status_code == 404, url
        assert http.post(f"/admin/models/{mid.lstrip('/')}/load").status_code == 404
    assert gateway_events() == before, gateway_events()[len(before):]
    assert {m: w["pid"] for m, w in hot(real_srv).items()} == {m: w["pid"] for m, w in workers.items()}


def test_the_audit_hook_does_see_file_access() -> None:
    """The probe above is only worth something if the hook notices a real access: it is
    installed in any child that has the environment, so check it in a plain interpreter."""
    import os
    import subprocess
    import sys
    import tempfile


    with tempfile.TemporaryDirectory() as d:
        Path(d, "sitecustomize.py").write_text(AUDIT_HOOK)
        log = Path(d, "events.log")
        env = {**os.environ, "PYTHONPATH": d, "AUDIT_PROBE_LOG": str(log),
               "AUDIT_PROBE_MARKS": PROBE}
        code = f"import pathlib; pathlib.Path('/tmp/{PROBE}-x').exists(); open('/nonexistent/{PROBE}', 'a') if False else None"
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
        assert f"os.stat '/tmp/{PROBE}-x'" in log.read_text()


# ---------------------------------------------------------------- property-based: any body

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
NASTY = st.sampled_from(["", "\x00", "\ud800", "<|im_end|>", "{{ messages }}", "{% for x in y %}",
                         "\u202e", "a" * 3000, -1, 0, 1, 2**31, 2**63, -(2**63) - 1, 10**400 // 10**390,
                         1e308, -1e-308, 0.5, True, [], {}, [[1, 2], [3]], [0, 99999, 2**32],
                         {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])
VALUE = JSON | NASTY
FIELDS = ["model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream", "stream_options",
          "logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "encoding_format", "dimensions", "user", "echo", "suffix"]
MESSAGE_FIELDS = ["role", "content", "name"]


def _valid(path: str, model: str) -> dict[str, Any]:
    if path == CHAT:
        return chat_body(model, "hi there", max_tokens=4)
    if path == COMPLETIONS:
        return {"model": model, "prompt": "hi there", "max_tokens": 4}
    return {"model": model, "input": "hi there"}


@st.composite
def bodies(draw: st.DrawFn, path: str) -> bytes:
    """A random JSON value, or a valid body with a few fields set, removed or nested-mutated,
    sometimes re-encoded badly (truncated, invalid UTF-8)."""
    if draw(st.integers(0, 5)) == 0:
        body: Any = draw(VALUE)
    else:
        body = _valid(path, draw(st.sampled_from(MODELS)))
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["set", "set", "del", "message"]))
            key = draw(st.sampled_from(FIELDS) | st.text(max_size=8))
            if op == "set":
                body[key] = draw(VALUE)
            elif op == "del":
                body.pop(key, None)
            elif isinstance(body.get("messages"), list) and body["messages"]:
                msg = body["messages"][0]
                if isinstance(msg, dict):
                    msg[draw(st.sampled_from(MESSAGE_FIELDS))] = draw(VALUE)
        # Bound the run time of the examples the model accepts: long answers prove nothing here.
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
                and 64 < body["max_tokens"] <= 2**20 and draw(st.booleans()):
            body["max_tokens"] = 64
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    mangle = draw(st.integers(0, 9))
    if mangle == 0 and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif mangle == 1:
        raw = raw.replace(b'"', b'"\xff', 1)
    return raw


def _check_response(r: httpx.Response) -> None:
    assert r.status_code != 500, r.text[:1000]
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:1000])
    if r.status_code != 200:
        _assert_clean_refusal(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])), events[-3:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        assert "error" not in r.json()


def _no_worker_harmed(srv: ServerProcess, baseline: dict[str, int], log_from: int) -> None:
    assert {m: w["pid"] for m, w in hot(srv).items()} == baseline
    assert all(w["state"] == "ready" for w in ps(srv)["workers"])
    tail = srv.log_path.read_text(errors="replace")[log_from:]
    assert "->crashed" not in tail and "unhandled error" not in tail, tail[-3000:]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_any_body_never_500s_nor_crashes_a_worker(real_srv: ServerProcess, http: httpx.Client,
                                                  baseline: dict[str, int], path: str) -> None:
    log_from = log_size(real_srv)
    statuses: Counter[int] = Counter()

    # Deterministic by default; RELIABILITY_FUZZ=N explores N fresh random examples instead.
    explore = int(os.environ.get("RELIABILITY_FUZZ", "0"))

    @settings(max_examples=explore or 150, deadline=None, derandomize=not explore, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies(path))
    def one(body: bytes) -> None:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        statuses[r.status_code] += 1
        _check_response(r)

    one()
    assert statuses[200] >= 5 and statuses[400] >= 50, statuses  # both sides were exercised
    _no_worker_harmed(real_srv, baseline, log_from)
