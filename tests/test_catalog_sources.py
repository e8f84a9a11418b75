"""Catalog sources: a ``repo`` resolved in a (fake) local Hugging Face cache, discovery of the
cache, and model ids that look like paths: a 404 that never reaches the filesystem."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlx_supervisor.gateway import catalog
from mlx_supervisor.gateway.testing.cli import fake
from mlx_supervisor.gateway.testing.server import ServerProcess
from mlx_supervisor.shared.config import Config, ModelConfig

WEIGHTS = 3_000_000
PATH_LIKE = ["../../etc/passwd", "/etc", "/etc/passwd", "~/models/x", "..", "C:\\Windows"]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A HF hub cache holding ``org/tiny`` (one complete snapshot, one half-downloaded) and
    ``org/no-weights`` (config only: not an MLX model, so discovery skips it)."""
    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 2048}')
    (snap / "model.safetensors").write_bytes(b"\0" * WEIGHTS)
    (hub / "models--org--tiny" / "snapshots" / "partial").mkdir()
    other = hub / "models--org--no-weights" / "snapshots" / "fff"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    yield snap


def test_a_repo_resolves_to_its_snapshot_in_the_local_cache(hf_cache: Path) -> None:
    cfg = Config(models={"tiny": ModelConfig(repo="org/tiny", kind="lm"),
                         "gone": ModelConfig(repo="org/absent", kind="lm")})
    entries, _, warnings = catalog.build(cfg, 64 * 2**30)
    assert entries["tiny"].path == str(hf_cache)
    assert entries["tiny"].estimate > WEIGHTS and entries["tiny"].context_length == 2048
    assert entries["gone"].path == ""
    assert warnings == ["model 'gone': repo 'org/absent' is not in the local Hugging Face cache "
                        "(allow_download = false)"]


def test_discovery_lists_cached_mlx_models_only_when_asked(hf_cache: Path) -> None:
    assert set(catalog.build(Config(), 64 * 2**30)[0]) == set()
    entries, _, _ = catalog.build(Config(discover_hf_cache=True), 64 * 2**30)
    assert set(entries) == {"org/tiny"} and entries["org/tiny"].path == str(hf_cache)
    # A configured model of the same name wins over the discovered one.
    cfg = Config(discover_hf_cache=True, models={"org/tiny": ModelConfig(repo="org/tiny", kind="embeddings")})
    assert catalog.build(cfg, 64 * 2**30)[0]["org/tiny"].kind == "embeddings"


def test_path_like_model_ids_are_404_over_http(hf_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    env = {"HF_HUB_CACHE": str(hf_cache.parents[2])}
    with ServerProcess(models={"fake": fake()}, settings={"discover_hf_cache": True},
                       workdir=tmp_path / "srv", env=env) as srv:
        ids = {m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]}
        assert ids == {"fake", "org/tiny"}
        # The snapshot directory itself is a loadable model on disk, and still not a model id.
        for name in [*PATH_LIKE, str(hf_cache)]:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=10,
                           json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 404, (name, r.text)
            assert r.json()["error"]["code"] == "model_not_found"
            r = httpx.post(srv.url + f"/admin/models/{name.lstrip('/')}/load", timeout=10)
            assert r.status_code == 404, (name, r.text)
        assert httpx.get(srv.url + "/admin/ps", timeout=10).json()["workers"] == []


def test_resolving_a_path_like_id_opens_nothing(tmp_path: Path) -> None:
    """In-process, under an audit hook: a lookup is a dict lookup (no open, listdir or scandir)."""
    from mlx_supervisor.gateway.errors import APIError
    from mlx_supervisor.gateway.serve import build_gateway

    cfg = Config(run_dir=str(tmp_path / "run"), models={"fake": ModelConfig(**fake())})
    gw, _ = build_gateway(cfg)
    events: list[tuple[str, Any]] = []
    watching = [True]

    def hook(event: str, args: Any) -> None:
        if watching[0] and event.split(".")[0] in ("open", "os", "shutil", "glob", "pathlib"):
            events.append((event, args))

    try:
        sys.addaudithook(hook)
        for name in PATH_LIKE:
            with pytest.raises(APIError) as e:
                gw.entry(name)
            assert e.value.status == 404
        watching[0] = False
    finally:
        watching[0] = False
        asyncio.run(gw.sup.transport.close())
    assert events == []
