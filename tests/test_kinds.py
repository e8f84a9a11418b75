"""Three kinds of model behind one port: text, embeddings (real MiniLM weights) and vision (a
tiny real Qwen2-VL), hot together under one budget, with LRU eviction across kinds."""

from __future__ import annotations

import base64
import io
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from mlx_supervisor.gateway.testing.server import ServerProcess


def _png_data_url(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def srv(demo_model_dir: Path, vlm_model_dir: Path, embeddings_model_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    images = tmp_path_factory.mktemp("images")
    Image.new("RGB", (56, 56), (0, 120, 200)).save(images / "blue.png")
    # Kinds are left to detection (config.json), except where a test needs a second lm.
    models: dict[str, dict[str, Any]] = {
        "lm": {"path": str(demo_model_dir), "memory": "300MB"},
        "vlm": {"path": str(vlm_model_dir), "memory": "300MB"},
        "emb": {"path": str(embeddings_model_dir), "memory": "300MB"},
        "lm2": {"path": str(demo_model_dir), "memory": "300MB", "kind": "lm"},
    }
    with ServerProcess(models, {"memory_budget": "1000MB", "vision": {"image_dirs": [str(images)]}}) as s:
        s.images = images  # type: ignore[attr-defined]
        yield s
    assert s.orphans == []


@pytest.fixture
def client(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=180)


def _hot(srv: ServerProcess) -> dict[str, dict[str, Any]]:
    return {w["model"]: w for w in httpx.get(srv.url + "/admin/ps").json()["workers"] if not w["spare"]}


def test_kinds_are_detected(client: openai.OpenAI) -> None:
    kinds = {m.id: m.kind for m in client.models.list().data}  # type: ignore[attr-defined]
    assert kinds == {"lm": "lm", "vlm": "vlm", "emb": "embeddings", "lm2": "lm"}


def test_three_kinds_hot_together_then_eviction_across_kinds(client: openai.OpenAI, srv: ServerProcess) -> None:
    # Text.
    r = client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].message.content is not None

    # Embeddings: single and batch, float and base64 agree, unit length, 384 dims.
    one = client.embeddings.create(model="emb", input="A cat sits on the mat.")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert one.usage.prompt_tokens > 0
    batch = client.embeddings.create(model="emb", input=["A cat sits on the mat.", "Stocks fell today."])
    assert [d.index for d in batch.data] == [0, 1]
    assert max(abs(a - b) for a, b in zip(batch.data[0].embedding, one.data[0].embedding, strict=True)) < 1e-4
    raw = httpx.post(srv.url + "/v1/embeddings", timeout=120,
                     json={"model": "emb", "input": ["A cat sits on the mat."], "encoding_format": "base64"}).json()
    vec = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(vec, one.data[0].embedding, strict=True)) < 1e-6
    assert abs(sum(v * v for v in vec) - 1.0) < 1e-3
    small = client.embeddings.create(model="emb", input="A cat.", dimensions=64)
    assert len(small.data[0].embedding) == 64

    # Vision: a streamed answer about an attached image (data URL) and a file:// image.
    stream = client.chat.completions.create(
        model="vlm", max_tokens=6, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What color is this?"},
            {"type": "image_url", "image_url": {"url": _png_data_url()}}]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[0].completion_tokens > 0 and usage[0].prompt_tokens > 10  # image tokens count
    assert isinstance(text, str)
    blue = srv.images / "blue.png"  # type: ignore[attr-defined]
    r = client.chat.completions.create(model="vlm", max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": blue.as_uri()}}, {"type": "text", "text": "Describe."}]}])
    assert r.choices[0].finish_reason in ("stop", "length")

    hot = _hot(srv)
    assert {"lm", "emb", "vlm"} <= set(hot)
    snap = httpx.get(srv.url + "/admin/ps").json()
    assert snap["used_bytes"] <= snap["budget_bytes"]

    # A fourth model: the least recently used (the text model) goes, whatever its kind.
    client.embeddings.create(model="emb", input="touch")
    client.chat.completions.create(model="lm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 20
    while set(_hot(srv)) != {"vlm", "emb", "lm2"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_hot(srv)) == {"vlm", "emb", "lm2"}
    # And the vlm (now LRU) makes way for the text model again.
    client.chat.completions.create(model="lm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    deadline = time.monotonic() + 20
    while "vlm" in _hot(srv) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_hot(srv)) == {"emb", "lm2", "lm"}


def test_wrong_kind_is_a_400_naming_the_kind(client: openai.OpenAI, srv: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lm", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png_data_url()}}]}])
    assert "text-only" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert "embeddings model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="vlm", input="x")
    assert "vlm model" in str(e.value)


def test_bad_images_are_refused_before_any_load(client: openai.OpenAI, srv: ServerProcess) -> None:
    cases = ["data:image/png;base64,!!!notbase64", "data:image/png;base64," + base64.b64encode(b"hello").decode(),
             "file:///etc/passwd", "file:///tmp/%00x.png", "http://127.0.0.1:9/x.png", "ftp://x/y.png"]
    for url in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="vlm", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}])
        assert e.value.body["code"] == "invalid_image", url  # type: ignore[index]


def test_a_negative_seed_on_a_vision_model_is_served(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="vlm", max_tokens=2, seed=-1, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                     {"type": "image_url", "image_url": {"url": _png_data_url()}}]}])
    assert r.choices[0].finish_reason in ("stop", "length")
