"""One pull of one repo: plan, small files, architecture check, weights, then ``finish``.

It runs on one thread (``huggingface_hub`` is blocking) and reports through events, the same
ones the HTTP route streams and the CLI draws bars from:

- ``started``: the commit, the files with their sizes, the total, the bytes already cached;
- ``progress``: per file and overall bytes, the rate and the ETA (at most every ``TICK`` s);
- ``done``: the model name the catalog now serves it under, and the snapshot path;
- ``error``: ``status``/``code``/``message``; ``code == "cancelled"`` after ``cancel()``.

The files go into the standard cache (``hf_hub_download``; the weights through fetch.py), so an
interrupted pull leaves an ``.incomplete`` blob that the next pull of the repo resumes with a
``Range`` request, and a second process pulling the same file waits on the cache's lock instead
of fetching it twice. Cancelling raises from inside the client's progress callback: the partial
blob stays.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.gateway.models import fetch, hub
from mlx_supervisor.shared.model_kind import detect_kind

log = logging.getLogger("mlx_supervisor.pull")
TICK = 0.25
# huggingface_hub reads the body in chunks of this (10 MiB by default); progress and a cancel
# land between chunks, so a smaller one keeps both prompt on a slow link.
CHUNK = 64 * 1024
Listener = Callable[[dict[str, Any]], None]


class PullCancelled(Exception):
    pass


class PullEvent(msgspec.Struct, frozen=True):
    """A pull's event on the gateway's bus, for the status page (``data`` is the SSE payload)."""

    data: dict[str, Any]


class Pull:
    def __init__(self, repo: str, revision: str | None, budget: int, headroom: float,
                 name: str | None = None, pin: bool = False):
        self.id = "pull-" + uuid.uuid4().hex[:12]
        self.repo, self.requested, self.name, self.pin = repo, revision, name, pin
        self.budget, self.headroom = budget, headroom
        self.plan: hub.Plan | None = None
        self.kind = "lm"
        self.path: Path | None = None
        self.state = "preparing"  # -> downloading -> done | error | cancelled
        self.done_bytes: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []  # started, the latest progress, the end
        self.listeners: list[Listener] = []
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._last_tick = 0.0
        self._t0 = 0.0
        self._fresh = 0  # bytes fetched by this pull (the rate excludes what was already there)
        self._current = ""  # the file being fetched (the client's progress bars report to it)

    # ------------------------------------------------------------ events

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def subscribe(self, fn: Listener) -> list[dict[str, Any]]:
        """Add a listener; returns the events it missed (under the lock: no gap, no repeat)."""
        with self._lock:
            self.listeners.append(fn)
            return list(self.history)

    def unsubscribe(self, fn: Listener) -> None:
        with self._lock:
            if fn in self.listeners:
                self.listeners.remove(fn)

    def emit(self, event: str, **data: Any) -> None:
        ev = {"event": event, "seq": next(self._seq), "id": self.id, "repo": self.repo,
              "time": time.time(), **data}
        with self._lock:
            self.history = [e for e in self.history if e["event"] != event] + [ev]
            listeners = list(self.listeners)
        for fn in listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("pull listener failed")

    def summary(self) -> dict[str, Any]:
        p = self.plan
        return {"id": self.id, "repo": self.repo, "revision": p.revision if p else self.requested,
                "name": self.name, "state": self.state, "bytes": sum(self.done_bytes.values()),
                "total": p.total if p else None}

    # ------------------------------------------------------------ progress (from the client)

    def cancel(self) -> None:
        self._cancel.set()

    def advance(self, name: str, n: int, fresh: bool = True) -> None:
        if self._cancel.is_set():
            raise PullCancelled
        self.done_bytes[name] = self.done_bytes.get(name, 0) + n
        if fresh:
            self._fresh += n
        now = time.monotonic()
        if self.state == "downloading" and now - self._last_tick >= TICK:
            self._last_tick = now
            self._progress(name)

    def _progress(self, name: str) -> None:
        assert self.plan is not None
        size = next((f.size for f in self.plan.files if f.name == name), 0)
        done, total = sum(self.done_bytes.values()), self.plan.total
        rate = self._fresh / max(1e-6, time.monotonic() - self._t0)
        eta = (total - done) / rate if rate > 0 else None
        self.emit("progress", file=name, file_bytes=self.done_bytes.get(name, 0), file_size=size,
                  bytes=done, total=total, rate=round(rate), eta=None if eta is None else round(eta, 1))

    def bar_class(self) -> type:
        """A tqdm-shaped class for ``hf_hub_download(tqdm_class=...)`` that feeds this pull."""
        pull = self

        class Bar:
            def __init__(self, *args: Any, desc: str = "", initial: int = 0, **kw: Any):
                self.name = pull._current
                if initial:
                    pull.advance(self.name, initial, fresh=False)

            def update(self, n: int | float = 1) -> None:
                pull.advance(self.name, int(n))

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *exc: Any) -> None:
                pass

            def close(self) -> None:
                pass

        return Bar

    # ------------------------------------------------------------ the work

    def run(self, finish: Callable[[Pull], str]) -> None:
        """Do the whole pull; never raises (the outcome is the last event)."""
        try:
            self.plan = hub.plan(self.repo, self.requested, self.budget, self.headroom)
            self._t0 = time.monotonic()
            snapshot = self._fetch(self.plan.small)
            self.kind = detect_kind(snapshot)
            hub.check_architecture(snapshot, self.kind, self.repo)
            self.state = "downloading"
            self.emit("started", revision=self.plan.revision, kind=self.kind, total=self.plan.total,
                      bytes=sum(self.done_bytes.values()), estimate=self.plan.estimate,
                      files=[{"name": f.name, "size": f.size} for f in self.plan.files])
            self._t0, self._fresh = time.monotonic(), 0  # the rate is the weights' alone
            self._fetch(self.plan.weights)
            self.path = snapshot
            model = finish(self)
            self.state = "done"
            self.emit("done", model=model, revision=self.plan.revision, path=str(snapshot),
                      kind=self.kind, bytes=self.plan.total, total=self.plan.total)
        except PullCancelled:
            self.state = "cancelled"
            self.emit("error", status=499, code="cancelled", message=f"pull {self.id} was cancelled")
        except APIError as e:
            self.state = "error"
            self.emit("error", status=e.status, code=e.code, param=e.param, message=e.message)
        except Exception as e:
            log.warning("pull %s of %s failed: %s", self.id, self.repo, e)
            self.state = "error"
            self.emit("error", status=502, code="download_failed",
                      message=f"downloading {self.repo} failed: {type(e).__name__}: {e}")

    def _fetch(self, files: list[hub.HubFile]) -> Path:
        """Each file into the cache (resuming a partial one); the snapshot directory."""
        from huggingface_hub import constants, hf_hub_download

        constants.DOWNLOAD_CHUNK_SIZE = CHUNK
        assert self.plan is not None
        snapshot: Path | None = None
        for f in files:
            if self._cancel.is_set():
                raise PullCancelled
            self._current = f.name
            if f.weights:  # resumable across interruptions (see fetch.py)
                local = fetch.fetch(self.repo, f.name, self.plan.revision, self.bar_class())
            else:
                local = hf_hub_download(self.repo, f.name, revision=self.plan.revision,
                                        tqdm_class=self.bar_class())
            self.done_bytes[f.name] = f.size
            if self.state == "downloading":
                self._progress(f.name)
            snapshot = Path(local).parents[f.name.count("/")]
        if snapshot is None:
            raise APIError(500, "nothing to fetch", code="internal_error")
        return snapshot


def split_ref(ref: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` -> (repo, revision); ValueError naming what is wrong."""
    repo, _, rev = ref.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo) or ".." in repo:
        raise ValueError(f"bad repo {ref[:200]!r}: expected ORG/NAME or ORG/NAME@REVISION")
    return repo, (rev or None)


def default_name(repo: str) -> str:
    return repo.split("/")[-1]

