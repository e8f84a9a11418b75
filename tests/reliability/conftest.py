"""One long-lived gateway with the real tiny llama, the real MiniLM embeddings model and a fake
model, shared by the reliability tests that need real MLX workers (loading one costs seconds).

The gateway runs with an audit hook (``sitecustomize``) that records every file-system or
process event whose arguments mention a probe string: that is how the bad-input tests show that
a model id which looks like a path never reaches the file system.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import AUDIT_HOOK, PROBE, TINY_CONTEXT, fake, wait_for


@pytest.fixture(scope="package")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the real gateway's audit hook writes: ``pid event 'argument'`` per line."""
    hook_dir = tmp_path_factory.mktemp("audit")
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    return hook_dir / "events.log"


@pytest.fixture(scope="package")
def real_srv(demo_model_dir: Path, embeddings_model_dir: Path, audit_log: Path) -> Iterator[ServerProcess]:
    """Models: ``tiny`` (real llama, context 128), ``emb`` (real MiniLM), both pinned so they
    load in parallel at start; ``fake`` (fake engine). ``max_body_bytes`` 100 kB."""
    hook_dir = audit_log.parent
    pythonpath = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    models = {
        "tiny": {"path": str(demo_model_dir), "context_length": TINY_CONTEXT, "pinned": True},
        "emb": {"path": str(embeddings_model_dir), "kind": "embeddings", "pinned": True},
        "fake": fake(FAKE_TOKEN_DELAY=0.002),
    }
    env = {"PYTHONPATH": pythonpath, "AUDIT_PROBE_LOG": str(audit_log),
           "AUDIT_PROBE_MARKS": f"{PROBE}|passwd|~root|/root"}
    with ServerProcess(models, {"max_body_bytes": 100_000}, env=env) as srv:
        def ready() -> bool:
            return httpx.get(srv.url + "/health/ready", timeout=5).status_code == 200

        wait_for(ready, timeout=120, step=0.2, what="pinned real models ready")
        yield srv
    assert srv.orphans == []
