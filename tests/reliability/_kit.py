"""Small helpers the reliability tests share: /admin/ps, SSE streams, the audit hook.

``fake``, ``wait_for`` and ``alive`` are re-exported from ``gateway.testing``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess, alive, wait_for
from mlx_supervisor.gateway.testing.server import fake_model as fake

MB = 10**6
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

T = TypeVar("T")



def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def ps(srv: ServerProcess, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(srv.url + "/admin/ps", headers=auth(key), timeout=10)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def hot(srv: ServerProcess, key: str | None = None) -> dict[str, dict[str, Any]]:
    """model id -> its worker row in /admin/ps (the warm spare excluded)."""
    return {w["model"]: w for w in ps(srv, key)["workers"] if not w["spare"]}


def model_info(srv: ServerProcess, model: str, key: str | None = None) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/v1/models/{model}", headers=auth(key), timeout=10)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def chat_body(model: str, content: str = "hello there", max_tokens: int = 5, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, **kw}


def log_has(srv: ServerProcess, text: str, since: int = 0) -> bool:
    return text in srv.log_path.read_text(errors="replace")[since:]


def log_size(srv: ServerProcess) -> int:
    return len(srv.log_path.read_text(errors="replace"))


@dataclass
class StreamResult:
    """What one streaming request got: its HTTP status, then (for 200) the SSE events in order."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw ``data: [DONE]``
    body: Any = None  # the JSON error body of a refused request
    text: str = ""

    @property
    def finish_reason(self) -> str | None:
        for ev in self.events:
            for ch in ev.get("choices") or []:
                if ch.get("finish_reason"):
                    return str(ch["finish_reason"])
        return None

    @property
    def error(self) -> dict[str, Any] | None:
        for ev in self.events:
            if "error" in ev:
                err: dict[str, Any] = ev["error"]
                return err
        return None

    @property
    def complete(self) -> bool:
        """Answered fully: a finish reason, [DONE] last, no error event."""
        return self.status == 200 and self.done and self.finish_reason is not None and self.error is None

    @property
    def refused(self) -> bool:
        """Refused cleanly before the stream began: 429/503 with an OpenAI error body."""
        return self.status in (429, 503) and isinstance(self.body, dict) and "error" in self.body


async def stream_request(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                         headers: dict[str, str] | None = None,
                         on_event: Callable[[StreamResult], Any] | None = None) -> StreamResult:
    """POST with ``stream: true`` and read the SSE stream to its end (or to an error event)."""
    async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as r:
        res = StreamResult(r.status_code, dict(r.headers))
        if r.status_code != 200:
            raw = await r.aread()
            try:
                res.body = json.loads(raw)
            except ValueError:
                res.body = raw.decode(errors="replace")
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.done = True
                continue
            assert not res.done, f"event after [DONE]: {data}"
            ev = json.loads(data)
            res.events.append(ev)
            for ch in ev.get("choices") or []:
                res.text += (ch.get("delta") or {}).get("content") or ch.get("text") or ""
            if on_event is not None:
                on_event(res)
    return res


__all__ = ["alive", "fake", "wait_for"]
