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

from mlx_supervisor.gateway.testing import ServerProcess

from ._kit import fake, wait_for

PROBE = "mlxsup-probe"  # any file-system event naming this (or passwd, ~root) is recorded
TINY_CONTEXT = 128

AUDIT_HOOK = '''
import os, sys
_log = os.environ.get("AUDIT_PROBE_LOG")
_marks = tuple(m for m in os.environ.get("AUDIT_PROBE_MARKS", "").split("|") if m)
_busy = [False]
_SKIP = ("object.", "code.", "exec", "compile", "import", "marshal", "sys.", "builtins.",
         "ctypes.", "socket.", "time.", "cpython.")

def _text(a):
    if isinstance(a, (str, bytes, os.PathLike)):
        try:
            return os.fsdecode(a)
        except Exception:
            return None
    if isinstance(a, (list, tuple)):
        return " ".join(t for t in map(_text, a) if t)
    return None

def _hook(event, args):
    if _busy[0] or event.startswith(_SKIP):
        return
    for a in args:
        t = _text(a)
        if t and (t == "/etc" or any(m in t for m in _marks)):
            _busy[0] = True
            try:
                fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.write(fd, f"{os.getpid()} {event} {t!r}\\n".encode())
                os.close(fd)
            finally:
                _busy[0] = False
            return

def _wrap(name):
    real = getattr(os, name)

    def probe(path, *a, **kw):
        _hook("os." + name, (path,))
        return real(path, *a, **kw)

    setattr(os, name, probe)

if _log and _marks:
    sys.addaudithook(_hook)
    for _name in ("stat", "lstat", "access", "readlink"):  # no audit events of their own
        _wrap(_name)
'''


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
