"""What every route answers, on a real gateway (`serve --config FILE`) with fake workers: CORS
preflights from allowed and refused origins, JSON 404/405 in each API's shape, a trailing slash
served rather than redirected, an Anthropic stream's error event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, fake_model

KEY = "sk-surface"
ALLOWED = "http://app.example.com"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    # config_last: the gateway is started as `mlx-supervisor serve --config FILE`.
    models = {"f": fake_model(), "slow": fake_model(FAKE_TOKEN_DELAY=0.05)}
    with ServerProcess(models, {"api_key": KEY, "cors_origins": [ALLOWED]}, config_last=True) as s:
        yield s
    assert s.orphans == []


def _preflight(srv: ServerProcess, path: str, origin: str) -> httpx.Response:
    return httpx.options(srv.url + path, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-api-key, anthropic-version"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses",
                                  "/v1/models", "/v1/embeddings"])
def test_preflight_from_an_allowed_origin_passes_without_a_key(srv: ServerProcess, path: str) -> None:
    r = _preflight(srv, path, ALLOWED)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    allowed = r.headers["access-control-allow-headers"].lower()
    for h in ("authorization", "content-type", "x-api-key", "anthropic-version"):
        assert h in allowed
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["content-type"] == "application/json"


def test_preflight_from_another_origin_gets_no_allow_header(srv: ServerProcess) -> None:
    r = _preflight(srv, "/v1/chat/completions", "http://evil.example.net")
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    assert r.json()["error"]["code"] == "cors_refused"


def test_an_allowed_origins_real_request_carries_the_allow_header(srv: ServerProcess) -> None:
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": "http://evil.example.net",
                                                   "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_no_cors_headers_without_cors_origins() -> None:
    with ServerProcess({"f": fake_model()}) as s:
        r = _preflight(s, "/v1/chat/completions", ALLOWED)
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_unknown_routes_and_wrong_methods_are_json(srv: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(srv.url + "/v1/nope", headers=auth)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found" and r.headers["x-request-id"]
    r = httpx.get(srv.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(srv.url + "/v1/chat/completions", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.json()["error"]["type"] == "invalid_request_error"
    # Under /v1/messages, Anthropic's shape.
    r = httpx.get(srv.url + "/v1/messages", headers={"x-api-key": KEY})
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.url + "/v1/messages/nope", headers={"x-api-key": KEY})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_a_trailing_slash_is_served_not_redirected(srv: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(srv.url + "/v1/models/", headers=auth)
    assert r.status_code == 200 and r.json()["object"] == "list"
    r = httpx.get(srv.url + "/health/")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.post(srv.url + "/v1/chat/completions/", headers=auth, json={
        "model": "f", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


def test_an_error_mid_anthropic_stream_is_an_error_event(srv: ServerProcess) -> None:
    rid = "req-anthropic-cut"
    body = {"model": "slow", "max_tokens": 2000, "stream": True,
            "messages": [{"role": "user", "content": "go"}]}
    with httpx.stream("POST", srv.url + "/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": KEY, "x-request-id": rid}) as r:
        lines = r.iter_lines()
        names: list[str] = []
        for line in lines:
            if line.startswith("event: "):
                names.append(line[7:])
            if names[-1:] == ["content_block_delta"]:
                break
        cut = httpx.delete(f"{srv.url}/v1/jobs/{rid}", headers={"Authorization": f"Bearer {KEY}"})
        assert cut.status_code == 200, cut.text
        rest = list(lines)
    names += [ln[7:] for ln in rest if ln.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "error", names
    data = [ln for ln in rest if ln.startswith("data: ")][-1]
    err = json.loads(data[6:])
    assert err["type"] == "error" and err["error"]["type"] and "cancel" in err["error"]["message"]


def test_anthropic_error_types_follow_the_status() -> None:
    from mlx_supervisor.gateway.errors import APIError

    want = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}
    for status, kind in want.items():
        assert APIError(status, "m").anthropic_body() == {"type": "error", "error": {"type": kind, "message": "m"}}


def test_the_fake_worker_names_its_stop_string_too(srv: ServerProcess) -> None:
    r = httpx.post(srv.url + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "f", "max_tokens": 8, "stop_sequences": ["tok3", "tok2"],
        "messages": [{"role": "user", "content": "hi"}]})
    body = r.json()
    assert body["content"][0]["text"] == "tok0 tok1 "
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == "tok2"
