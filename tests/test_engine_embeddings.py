"""The embeddings engine, driven in-process on the real all-MiniLM-L6-v2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlx_supervisor.shared.protocol import Embed, Embeddings, Error, Generate
from mlx_supervisor.worker.engines.embeddings import EmbeddingsEngine

DIMS = 384


@pytest.fixture(scope="module")
def engine(embeddings_model_dir: Path) -> Iterator[EmbeddingsEngine]:
    eng = EmbeddingsEngine()
    info = eng.load(str(embeddings_model_dir))
    assert (info.kind, info.embedding_dims, info.context_length) == ("embeddings", DIMS, 512)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def small(embeddings_model_dir: Path) -> Iterator[EmbeddingsEngine]:
    """Same model, a 16-token limit and 64-token passes: truncation and splitting stay cheap
    (MLX's CPU matmul here needs ~10 s for one 512-token input)."""
    eng = EmbeddingsEngine(max_length=16, tokens_per_pass=64)
    assert eng.load(str(embeddings_model_dir)).context_length == 16
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(embeddings_model_dir: Path) -> tuple[Any, Any]:
    """mlx-embeddings used directly, as its README shows: the engine must agree with it."""
    from mlx_embeddings import load

    return load(str(embeddings_model_dir))


def run(engine: EmbeddingsEngine, req: Embed | Generate) -> list[Any]:
    out: list[Any] = []
    engine.submit(req, out.append)
    while engine.has_work():
        engine.step(out.append)
    return out


def embed(engine: EmbeddingsEngine, **kw: Any) -> tuple[np.ndarray, Embeddings]:
    (msg,) = run(engine, Embed(id="e", **kw))
    assert isinstance(msg, Embeddings), msg
    vecs = np.stack([np.frombuffer(v, dtype="<f4") for v in msg.vectors])
    assert vecs.shape == (len(msg.vectors), msg.dims)
    return vecs, msg


def error(engine: EmbeddingsEngine, req: Embed | Generate) -> Error:
    (msg,) = run(engine, req)
    assert isinstance(msg, Error), msg
    return msg


def test_matches_mlx_embeddings(engine: EmbeddingsEngine, reference: tuple[Any, Any]) -> None:
    from mlx_embeddings import generate

    texts = ["A man is eating food.", "The weather is lovely today, isn't it?"]
    vecs, msg = embed(engine, texts=texts)
    want = np.array(generate(*reference, texts=texts).text_embeds)
    cos = (vecs * want).sum(axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert msg.dims == DIMS
    ids = reference[1](texts)["input_ids"]
    assert msg.prompt_tokens == sum(len(x) for x in ids)


def test_related_sentences_score_higher(engine: EmbeddingsEngine) -> None:
    vecs, _ = embed(
        engine,
        texts=["A cat sits on the mat.", "A kitten is lying on a rug.", "Stock markets fell sharply."],
    )
    sims = vecs @ vecs.T
    assert sims[0, 1] > 0.5 > sims[0, 2]
    assert sims[0, 1] > sims[1, 2]


def test_batch_equals_singles(engine: EmbeddingsEngine) -> None:
    texts = ["short", "a somewhat longer sentence about embeddings", "medium length text"]
    batch, msg = embed(engine, texts=texts)
    singles = [embed(engine, texts=[t]) for t in texts]
    assert np.allclose(batch, np.concatenate([v for v, _ in singles]), atol=1e-5)
    assert msg.prompt_tokens == sum(m.prompt_tokens for _, m in singles)


def test_token_ids_equal_text(engine: EmbeddingsEngine, reference: tuple[Any, Any]) -> None:
    text = "Token arrays are fed to the encoder as given."
    ids = reference[1].encode(text)
    from_text, _ = embed(engine, texts=[text])
    from_ids, msg = embed(engine, token_ids=[ids])
    assert np.allclose(from_text, from_ids, atol=1e-6)
    assert msg.prompt_tokens == len(ids)


def test_dimensions_truncate_and_renormalize(engine: EmbeddingsEngine) -> None:
    full, _ = embed(engine, texts=["matryoshka"])
    small, msg = embed(engine, texts=["matryoshka"], dimensions=64)
    assert msg.dims == 64 and small.shape == (1, 64)
    assert np.isclose(np.linalg.norm(small), 1.0, atol=1e-5)
    assert np.allclose(small[0], full[0, :64] / np.linalg.norm(full[0, :64]), atol=1e-6)
    assert error(engine, Embed(id="e", texts=["x"], dimensions=DIMS + 1)).param == "dimensions"


def test_overlong_input_is_truncated(small: EmbeddingsEngine, reference: tuple[Any, Any]) -> None:
    from mlx_embeddings import generate

    text = " ".join(f"word{i}" for i in range(30))
    vecs, msg = embed(small, texts=[text])
    assert msg.prompt_tokens == 16
    want = np.array(generate(*reference, texts=[text], max_length=16).text_embeds)
    assert float((vecs * want).sum()) > 0.9999
    ids = reference[1].encode(text)
    cut, id_msg = embed(small, token_ids=[ids])
    assert id_msg.prompt_tokens == 16
    assert np.allclose(cut, embed(small, token_ids=[ids[:16]])[0], atol=1e-6)


def test_many_inputs_split_into_passes(small: EmbeddingsEngine) -> None:
    """A request over the per-pass token budget takes several steps and keeps input order."""
    texts = [("lorem ipsum " * 10) if i % 2 else f"item {i}" for i in range(12)]
    msgs: list[Any] = []
    small.submit(Embed(id="big", texts=texts), msgs.append)
    steps = 0
    while small.has_work():
        small.step(msgs.append)
        steps += 1
    assert steps > 2
    (msg,) = msgs
    got = np.stack([np.frombuffer(v, dtype="<f4") for v in msg.vectors])
    singles = np.concatenate([embed(small, texts=[t])[0] for t in texts[:4]])
    assert np.allclose(got[:4], singles, atol=1e-5)


@pytest.mark.parametrize(
    "req",
    [
        Embed(id="e", texts=[]),
        Embed(id="e", texts=["ok", ""]),
        Embed(id="e", token_ids=[[]]),
        Embed(id="e", token_ids=[[101, 10**6]]),
        Embed(id="e"),
        Embed(id="e", texts=["x"], token_ids=[[1]]),
        Embed(id="e", texts=["x"], dimensions=0),
    ],
)
def test_bad_input_is_400(engine: EmbeddingsEngine, req: Embed) -> None:
    err = error(engine, req)
    assert err.status == 400 and err.id == "e" and err.param in ("input", "dimensions")


def test_generate_is_refused(engine: EmbeddingsEngine) -> None:
    err = error(engine, Generate(id="g", prompt="hello"))
    assert err.status == 400
    assert err.message == f"model {engine.model_id} is an embeddings model"
    assert err.code == "model_not_supported"


def test_cancel_drops_queued_request(engine: EmbeddingsEngine) -> None:
    out: list[Any] = []
    engine.submit(Embed(id="a", texts=["one"]), out.append)
    engine.submit(Embed(id="b", texts=["two"]), out.append)
    engine.cancel("a")
    while engine.has_work():
        engine.step(out.append)
    assert [m.id for m in out] == ["b"]
    assert engine.memory().footprint > 0


def test_real_worker_process(workers: Any, embeddings_model_dir: Path) -> None:
    """The worker loads this engine by kind and reports the vector width in Ready."""
    from mlx_supervisor.shared.protocol import Hello, Ready

    w = workers.spawn("minilm", "embeddings", embeddings_model_dir)
    assert isinstance(w.recv(timeout=60), Hello)
    ready = w.recv(timeout=60)
    assert isinstance(ready, Ready), ready
    assert (ready.kind, ready.embedding_dims, ready.context_length) == ("embeddings", DIMS, 512)
    w.send(Embed(id="w1", texts=["hello", "world"], dimensions=8))
    msg = w.recv(timeout=30)
    assert isinstance(msg, Embeddings) and msg.dims == 8 and len(msg.vectors) == 2
    assert all(len(v) == 8 * 4 for v in msg.vectors)
