"""The vlm engine, driven in-process on a tiny real Qwen2-VL (random weights)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlx_supervisor.shared.protocol import Chunk, Done, Embed, Error, Generate, Started
from mlx_supervisor.worker.engines.vlm import VLMEngine


def png(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def ask(text: str, n_images: int = 1) -> list[dict[str, Any]]:
    """A user turn as the gateway sends it: image parts replaced by placeholders."""
    return [{"role": "user",
             "content": [{"type": "text", "text": text}] + [{"type": "image"}] * n_images}]


@pytest.fixture(scope="module")
def engine(vlm_model_dir: Path) -> Iterator[VLMEngine]:
    eng = VLMEngine()
    info = eng.load(str(vlm_model_dir))
    assert (info.kind, info.context_length) == ("vlm", 4096)
    yield eng
    eng.close()


def run(engine: VLMEngine, *reqs: Generate | Embed) -> list[Any]:
    out: list[Any] = []
    for req in reqs:
        engine.submit(req, out.append)
    while engine.has_work():
        engine.step(out.append)
    return out


def of(msgs: list[Any], rid: str) -> list[Any]:
    return [m for m in msgs if m.id == rid]


def text(msgs: list[Any]) -> str:
    return "".join(m.text for m in msgs if isinstance(m, Chunk))


def test_answers_with_an_image_and_streams(engine: VLMEngine) -> None:
    out = run(engine, Generate(id="a", messages=ask("What is in the picture?"),
                               images=[png()], max_tokens=16, seed=1))
    assert isinstance(out[0], Started) and isinstance(out[-1], Done)
    chunks = [m for m in out if isinstance(m, Chunk)]
    assert len(chunks) > 1  # streamed, not one blob
    done = out[-1]
    assert done.finish_reason in ("stop", "length")
    assert done.completion_tokens <= 16
    assert sum(c.tokens for c in chunks) <= done.completion_tokens
    # The image is part of the prompt: its tokens count, and it changes the answer.
    plain = run(engine, Generate(id="b", messages=ask("What is in the picture?", 0),
                                 max_tokens=2))
    assert out[0].prompt_tokens > plain[0].prompt_tokens == plain[-1].prompt_tokens
    assert done.prompt_tokens == out[0].prompt_tokens


def test_same_request_same_answer_and_images_matter(engine: VLMEngine) -> None:
    def greedy(rid: str, image: bytes) -> str:
        return text(run(engine, Generate(id=rid, messages=ask("Describe."), images=[image],
                                         max_tokens=12, temperature=0.0)))

    red = greedy("r1", png((255, 0, 0)))
    assert red == greedy("r2", png((255, 0, 0)))
    assert red != greedy("n", png((0, 0, 255), (120, 90)))


def test_max_tokens_is_honoured(engine: VLMEngine) -> None:
    out = run(engine, Generate(id="m", messages=ask("Count.", 0), max_tokens=3, temperature=0.0,
                               logit_bias={2: -100.0, 0: -100.0}))  # no EOS: run to the limit
    assert out[-1] == Done(id="m", finish_reason="length", prompt_tokens=out[0].prompt_tokens,
                           completion_tokens=3)


def test_two_images_and_text_only_turns(engine: VLMEngine) -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                         {"type": "image"}]}]
    out = run(engine, Generate(id="two", messages=msgs, images=[png(), png((0, 255, 0))],
                               max_tokens=2))
    assert isinstance(out[-1], Done)
    out = run(engine, Generate(id="p", prompt="plain text prompt", max_tokens=2))
    assert isinstance(out[-1], Done)


def test_stop_string_ends_the_stream(engine: VLMEngine) -> None:
    def say(rid: str, stop: list[str]) -> list[Any]:
        return run(engine, Generate(id=rid, messages=ask("Say things.", 0), max_tokens=24,
                                    seed=1, logit_bias={2: -100.0, 0: -100.0}, stop=stop))

    full = say("s1", [])
    chunks = [m.text for m in full if isinstance(m, Chunk)]
    assert len(chunks) > 1, chunks
    # A stop string inside the first chunk: the stream must end long before max_tokens.
    stop = chunks[0].strip()[:2]
    whole = "".join(chunks)
    out = say("s2", [stop])
    assert out[-1].finish_reason == "stop"
    assert out[-1].completion_tokens < full[-1].completion_tokens == 24
    assert text(out) == whole[:whole.index(stop)]


def test_logprobs_and_seed(engine: VLMEngine) -> None:
    def sample(rid: str, seed: int) -> list[Any]:
        return run(engine, Generate(id=rid, messages=ask("Go.", 0), max_tokens=6,
                                    temperature=1.0, seed=seed, logprobs=True, top_logprobs=2))

    a, b = sample("x1", 7), sample("x2", 7)
    assert text(a) == text(b)
    lps = [lp for m in a if isinstance(m, Chunk) for lp in m.logprobs or []]
    assert lps and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps)


@pytest.mark.parametrize(
    ("req", "param"),
    [
        (Generate(id="e", messages=ask("x"), images=[b"not an image"]), "messages"),
        (Generate(id="e", messages=ask("x"), images=[png()[:40]]), "messages"),  # truncated PNG
        (Generate(id="e", messages=ask("x", 2), images=[png()]), "messages"),
        (Generate(id="e", prompt="x", images=[png()]), "messages"),
        (Generate(id="e", messages=ask("x", 0), max_tokens=0), "max_tokens"),
        (Generate(id="e", messages=[{"role": "user", "content": [{"type": "audio"}]}]),
         "messages"),
        (Generate(id="e", prompt_ids=[10**6]), "prompt"),
        (Embed(id="e", texts=["x"]), "model"),
    ],
)
def test_bad_requests_are_400(engine: VLMEngine, req: Generate | Embed, param: str) -> None:
    (err,) = run(engine, req)
    assert isinstance(err, Error) and err.status == 400 and err.param == param, err


def test_cancel_running_and_queued(engine: VLMEngine) -> None:
    out: list[Any] = []
    long = {"max_tokens": 50, "logit_bias": {2: -100.0, 0: -100.0}}
    engine.submit(Generate(id="c1", messages=ask("a"), images=[png()], **long), out.append)
    engine.submit(Generate(id="c2", messages=ask("b", 0), **long), out.append)
    engine.submit(Generate(id="c3", messages=ask("c", 0), max_tokens=2), out.append)
    for _ in range(3):
        engine.step(out.append)
    engine.cancel("c1")
    engine.cancel("c2")
    seen = len(out)
    while engine.has_work():
        engine.step(out.append)
    assert not [m for m in out[seen:] if m.id in ("c1", "c2")]
    assert not of(out, "c2")
    assert isinstance(of(out, "c1")[0], Started) and not any(isinstance(m, Done) for m in out
                                                             if m.id == "c1")
    assert isinstance(of(out, "c3")[-1], Done)
    assert engine.memory().active > 0


def test_real_worker_process_serves_images(workers: Any, vlm_model_dir: Path) -> None:
    """The worker loads this engine by kind and carries image bytes over the wire."""
    from mlx_supervisor.shared.protocol import Hello, Ready

    w = workers.spawn("tiny-vl", "vlm", vlm_model_dir)
    assert isinstance(w.recv(timeout=60), Hello)
    ready = w.recv(timeout=60)
    assert isinstance(ready, Ready) and ready.kind == "vlm", ready
    w.send(Generate(id="w1", messages=ask("What?"), images=[png()], max_tokens=4))
    msgs = w.until(Done, timeout=60)
    assert isinstance(msgs[0], Started) and msgs[-1].completion_tokens <= 4
    w.send(Generate(id="w2", messages=ask("What?"), images=[b"junk"]))
    err = w.recv(timeout=30)
    assert isinstance(err, Error) and err.status == 400


def test_response_format_constrains_a_vision_answer(engine: VLMEngine) -> None:
    import json

    import jsonschema

    from mlx_supervisor.shared.protocol import JsonFormat

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["color", "n"], "additionalProperties": False}
    out = run(engine, Generate(id="j", messages=ask("Which color?"), images=[png()],
                               max_tokens=40, temperature=0.0,
                               json_format=JsonFormat(schema=schema)))
    assert isinstance(out[-1], Done) and out[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text(out)), schema)
