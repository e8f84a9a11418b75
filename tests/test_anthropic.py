"""Anthropic Messages as the official ``anthropic`` SDK sees it, against a real gateway and the
real tiny llama: the same run as chat completions, in Anthropic's shapes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess

KEY = "sk-ant-test"
MSGS = [{"role": "user", "content": "Tell me a story about a cat."}]
T0 = {"temperature": 0}


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess({"demo": {"path": str(demo_model_dir), "aliases": ["claude-tiny"]}},
                       {"api_key": KEY}) as s:
        yield s
    assert s.orphans == []


@pytest.fixture
def client(srv: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)


def test_create_plain_is_the_same_run_as_chat_completions(client: anthropic.Anthropic,
                                                          srv: ServerProcess) -> None:
    # This SDK no longer types the sampling parameters; the API still takes them.
    m = client.messages.create(model="claude-tiny", max_tokens=12, extra_body=T0, messages=MSGS,
                               system=[{"type": "text", "text": "Be brief."}],
                               metadata={"user_id": "u-1"})
    assert m.type == "message" and m.role == "assistant" and m.model == "demo"
    assert m.id.startswith("msg_") and m.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in m.content] == ["text"]
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 12
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    c = oa.chat.completions.create(model="demo", max_tokens=12, temperature=0,
                                   messages=[{"role": "system", "content": "Be brief."}, *MSGS])  # type: ignore[list-item]
    assert m.content[0].text == c.choices[0].message.content  # type: ignore[union-attr]
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == c.usage.prompt_tokens  # type: ignore[union-attr,operator]


def test_max_tokens_ends_with_max_tokens(client: anthropic.Anthropic) -> None:
    m = client.messages.create(model="demo", max_tokens=1, messages=MSGS,  # type: ignore[arg-type]
                               extra_body={"top_k": 5, "top_p": 0.9})
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 1


def test_stream_has_the_full_event_sequence_and_the_same_text(client: anthropic.Anthropic) -> None:
    plain = client.messages.create(model="demo", max_tokens=10, extra_body=T0, messages=MSGS)  # type: ignore[arg-type]
    names: list[str] = []
    with client.messages.stream(model="demo", max_tokens=10, extra_body=T0, messages=MSGS) as s:  # type: ignore[arg-type]
        for ev in s:
            names.append(ev.type)
        final = s.get_final_message()
    assert final.content[0].text == plain.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_start" in names and "content_block_stop" in names and "message_delta" in names


def test_raw_stream_names_each_event_and_pings(srv: ServerProcess) -> None:
    with httpx.stream("POST", srv.url + "/v1/messages", headers={"x-api-key": KEY},
                      json={"model": "demo", "max_tokens": 4, "messages": MSGS, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("event: ")]
    events = [ln[len("event: "):] for ln in lines]
    assert events[:2] == ["message_start", "ping"]
    assert events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 1


def test_count_tokens_matches_the_prompt_of_a_real_run(client: anthropic.Anthropic) -> None:
    n = client.messages.count_tokens(model="demo", messages=MSGS, system="Be brief.")  # type: ignore[arg-type]
    m = client.messages.create(model="demo", max_tokens=1, messages=MSGS, system="Be brief.")  # type: ignore[arg-type]
    assert n.input_tokens > 0
    assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_errors_are_anthropic_shaped(client: anthropic.Anthropic, srv: ServerProcess) -> None:
    bad = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as au:
        bad.messages.create(model="demo", max_tokens=5, messages=MSGS)  # type: ignore[arg-type]
    assert au.value.body["type"] == "error"  # type: ignore[index]
    assert au.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as nf:
        client.messages.create(model="nope", max_tokens=5, messages=MSGS)  # type: ignore[arg-type]
    body = nf.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "demo" in body["error"]["message"]  # type: ignore[index]
    for extra in ({"temperature": 1.5}, {"top_k": -1}, {"stop_sequences": [""]},
                  {"thinking": {"type": "enabled", "budget_tokens": 10}}):
        with pytest.raises(anthropic.BadRequestError) as br:
            client.messages.create(model="demo", max_tokens=5, messages=MSGS, extra_body=extra)  # type: ignore[arg-type]
        assert br.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    r = httpx.post(srv.url + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": "demo", "messages": MSGS})  # max_tokens is required
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/messages", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "demo", "max_tokens": 2, "messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "demo", "max_tokens": 2, "messages": [*MSGS, {"role": "assistant", "content": "Once"}]})
    assert r.status_code == 400 and "prefill" in r.json()["error"]["message"]


def test_image_blocks_reach_a_vision_model_as_in_chat_and_responses(vlm_model_dir: Path) -> None:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    with ServerProcess({"vlm": {"path": str(vlm_model_dir)}}) as s:
        a = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0, timeout=180)
        m = a.messages.create(model="vlm", max_tokens=6, extra_body=T0, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
            {"type": "text", "text": "What color?"}]}])
        oa = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=180)
        url = "data:image/png;base64," + data
        c = oa.chat.completions.create(model="vlm", max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What color?"}]}])
        r = oa.responses.create(model="vlm", max_output_tokens=6, temperature=0, store=False, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"},
                                         {"type": "input_text", "text": "What color?"}]}])
        assert m.content[0].text == c.choices[0].message.content == r.output_text  # type: ignore[union-attr]
        assert m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0) == c.usage.prompt_tokens  # type: ignore[union-attr]
        assert c.usage.prompt_tokens > 20  # the image's tokens are in the prompt
        bad = httpx.post(s.url + "/v1/messages", json={"model": "vlm", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert s.orphans == []


def test_a_stop_sequence_ends_the_text_and_is_named(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model="demo", max_tokens=16, extra_body=T0, messages=MSGS)  # type: ignore[arg-type]
    text = full.content[0].text  # type: ignore[union-attr]
    assert len(text) > 8, text
    word = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.messages.create(model="demo", max_tokens=16, extra_body=T0, messages=MSGS,  # type: ignore[arg-type]
                                 stop_sequences=["\u0000never", word])
    assert cut.content[0].text == text[:text.find(word)]  # type: ignore[union-attr]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    with client.messages.stream(model="demo", max_tokens=16, extra_body=T0, messages=MSGS,  # type: ignore[arg-type]
                                stop_sequences=[word]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word
    if full.stop_reason == "end_turn":  # EOS is not a stop sequence
        assert full.stop_sequence is None


def test_a_stop_sequence_that_is_one_token_is_named_too(client: anthropic.Anthropic, srv: ServerProcess) -> None:
    # A stop word whose token ids are generated is caught by the token-level check first.
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    c = oa.chat.completions.create(model="demo", max_tokens=16, temperature=0, logprobs=True, messages=MSGS)  # type: ignore[arg-type]
    tokens = [lp.token for lp in c.choices[0].logprobs.content]  # type: ignore[union-attr]
    text = "".join(tokens)
    k = next(i for i in range(1, len(tokens)) if len(tokens[i]) >= 2
             and text.find(tokens[i]) == len("".join(tokens[:i])))
    cut = client.messages.create(model="demo", max_tokens=16, extra_body=T0, messages=MSGS,  # type: ignore[arg-type]
                                 stop_sequences=[tokens[k]])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == tokens[k]
    assert cut.content[0].text == "".join(tokens[:k])  # type: ignore[union-attr]
    chat = oa.chat.completions.create(model="demo", max_tokens=16, temperature=0, messages=MSGS,  # type: ignore[arg-type]
                                      stop=[tokens[k]])
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].stop_reason == tokens[k]  # type: ignore[attr-defined]
