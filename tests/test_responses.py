"""OpenAI Responses as the official ``openai`` SDK sees it, against a real gateway and the real
tiny llama: the same run as chat completions, stored in the ledger's file across restarts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess, fake_model

KEY = "sk-resp-test"
PROMPT = "Tell me a story about a cat."


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess({"demo": {"path": str(demo_model_dir)}, "slow": fake_model(FAKE_TOKEN_DELAY=0.05)},
                       {"api_key": KEY}, workdir=tmp_path_factory.mktemp("resp")) as s:
        yield s
    assert s.orphans == []


def _client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def client(srv: ServerProcess) -> openai.OpenAI:
    return _client(srv)


def test_create_plain_is_the_same_run_as_chat_completions(client: openai.OpenAI) -> None:
    r = client.responses.create(model="demo", input=PROMPT, instructions="Be brief.",
                                max_output_tokens=10, temperature=0, metadata={"k": "v"})
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "demo"
    assert r.status in ("completed", "incomplete") and r.store is True and r.metadata == {"k": "v"}
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"  # type: ignore[union-attr]
    assert r.usage and r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 10
    c = client.chat.completions.create(model="demo", max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}])
    assert r.output_text == c.choices[0].message.content
    assert r.usage.input_tokens == c.usage.prompt_tokens  # type: ignore[union-attr]
    if c.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    # A list of items says the same as the string.
    r2 = client.responses.create(model="demo", instructions="Be brief.", max_output_tokens=10,
                                 temperature=0, input=[{"role": "user", "content": [
                                     {"type": "input_text", "text": PROMPT}]}])
    assert r2.output_text == r.output_text


def test_stream_numbers_every_event_and_says_the_same(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="demo", input=PROMPT, max_output_tokens=8, temperature=0,
                                    store=False)
    events = list(client.responses.create(model="demo", input=PROMPT, max_output_tokens=8,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response." + plain.status]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert text == plain.output_text == final.output_text
    assert final.usage.output_tokens == plain.usage.output_tokens  # type: ignore[union-attr]


def test_retrieve_delete_and_store_false(client: openai.OpenAI) -> None:
    r = client.responses.create(model="demo", input=PROMPT, max_output_tokens=4)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    unstored = client.responses.create(model="demo", input=PROMPT, max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as nf:
        client.responses.create(model="demo", input="more", max_output_tokens=4,
                                previous_response_id=unstored.id)
    assert nf.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_previous_response_id_continues_across_a_gateway_restart(srv: ServerProcess) -> None:
    first = _client(srv).responses.create(model="demo", input=PROMPT, max_output_tokens=6,
                                          temperature=0)
    assert first.usage is not None
    srv.stop()
    srv.start()
    client = _client(srv)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    follow = client.responses.create(model="demo", input="And then?", max_output_tokens=4,
                                     previous_response_id=first.id, temperature=0)
    assert follow.previous_response_id == first.id
    # The continuation's prompt holds the first exchange: exactly as if sent in full.
    c = client.chat.completions.create(model="demo", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert follow.usage.input_tokens == c.usage.prompt_tokens  # type: ignore[union-attr]
    assert follow.output_text == c.choices[0].message.content


def test_cancel_stops_a_response_in_flight(srv: ServerProcess, client: openai.OpenAI) -> None:
    events: list[object] = []
    started = threading.Event()

    def consume() -> None:
        for e in client.responses.create(model="slow", input="go", max_output_tokens=2000, stream=True):
            events.append(e)
            if e.type == "response.output_text.delta":
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60)
    rid = next(e.response.id for e in events if e.type == "response.created")  # type: ignore[attr-defined]
    r = httpx.post(f"{srv.url}/v1/responses/{rid}/cancel", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    t.join(30)
    last = events[-1]
    assert last.type == "response.failed" and last.response.status == "cancelled"  # type: ignore[attr-defined]
    assert client.responses.retrieve(rid).status == "cancelled"
    r = httpx.post(f"{srv.url}/v1/responses/{rid}/cancel", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 409


def test_unsupported_parameters_are_refused_by_name(client: openai.OpenAI) -> None:
    for extra, param in (({"background": True}, "background"), ({"truncation": "auto"}, "truncation"),
                         ({"tools": [{"type": "web_search"}]}, "tools[0].type")):
        with pytest.raises(openai.BadRequestError) as br:
            client.responses.create(model="demo", input="x", **extra)  # type: ignore[arg-type]
        assert br.value.body["param"] == param, br.value.body  # type: ignore[index]


def test_without_a_ledger_answers_say_they_were_not_stored() -> None:
    with ServerProcess({"f": fake_model()}, {"ledger": {"enabled": False}}) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = client.responses.create(model="f", input="hello there", max_output_tokens=3)
        assert r.store is False and r.output_text
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
    assert s.orphans == []
