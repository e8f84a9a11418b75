"""A local stand-in for the Hugging Face Hub: the routes ``huggingface_hub`` calls, over files on disk.

Tests point ``HF_ENDPOINT`` at it and let the real client download. Every directory two levels
under ``root`` (``root/ORG/NAME``) is a repo at one commit (a hash of its files). Served:

- ``GET /api/models/REPO[/revision/REV]`` (``?blobs=true``: sizes, blob ids, LFS sha256s);
- ``HEAD``/``GET /REPO/resolve/REV/FILE`` with ``ETag``/``X-Linked-Etag``, ``X-Repo-Commit``,
  sizes and ``Range`` (206), the Hub's ``X-Error-Code`` on a 404.

``--rate`` throttles weight files (bytes per second) so a test can watch progress, cancel, or
kill the server mid-file; ``--log`` appends one JSON line per request (method, path, range,
Authorization, the bytes sent), so a test can prove what was and was not fetched, and how.

Run: ``python -m mlx_supervisor.gateway.testing.fakehub ROOT --port P [--rate B] [--log FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".npz")
BIG = 64 * 2**20
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime: float, algo: str) -> str:
    h = hashlib.new(algo)
    if algo == "sha1":  # a git blob id
        h.update(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(p: Path, algo: str) -> str:
    """The file's git blob id (sha1) or LFS oid (sha256); files over ``BIG`` (sparse test files
    that only need a size in the listing) get a hash of their name, size and time instead."""
    st = p.stat()
    if st.st_size > BIG:
        return hashlib.new(algo, f"{p}:{st.st_size}:{st.st_mtime}".encode()).hexdigest()
    return _digest(str(p), st.st_size, st.st_mtime, algo)


class Hub:
    def __init__(self, root: Path, rate: float = 0.0, log: Path | None = None):
        self.root = root
        self.rate = rate
        self.log_path = log
        self._lock = threading.Lock()

    def files(self, repo: str) -> list[Path] | None:
        d = self.root / repo
        if repo.count("/") != 1 or ".." in repo or not d.is_dir():
            return None
        return sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))

    def commit(self, repo: str, files: list[Path]) -> str:
        h = hashlib.sha1()
        for p in files:
            h.update(str(p.relative_to(self.root / repo)).encode() + digest(p, "sha1").encode())
        return h.hexdigest()

    def sibling(self, repo: str, p: Path) -> dict[str, Any]:
        size = p.stat().st_size
        out: dict[str, Any] = {"rfilename": str(p.relative_to(self.root / repo)), "size": size,
                               "blobId": digest(p, "sha1")}
        if p.name.endswith(LFS_SUFFIXES):
            out["lfs"] = {"sha256": digest(p, "sha256"), "size": size, "pointerSize": 134}
        return out

    def record(self, entry: dict[str, Any]) -> None:
        if self.log_path is None:
            return
        with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    def _route(self, body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path)
        if m:
            return self._info(m.group(1), m.group(2), "blobs=true" in url.query.lower(), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(m.group(1), m.group(2), m.group(3), body)
        self._error(404, "EntryNotFound", f"no route {path}")

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _resolve(self, repo: str, rev: str | None) -> tuple[list[Path], str] | None:
        hub = self.server.hub
        files = hub.files(repo)
        if files is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        sha = hub.commit(repo, files)
        if rev not in (None, "main", sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return files, sha

    def _info(self, repo: str, rev: str | None, blobs: bool, body: bool) -> None:
        found = self._resolve(repo, rev)
        if found is None:
            return
        files, sha = found
        hub = self.server.hub
        siblings = [hub.sibling(repo, p) if blobs else {"rfilename": str(p.relative_to(hub.root / repo))}
                    for p in files]
        data = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": False,
                           "siblings": siblings, "tags": ["mlx"]}).encode()
        hub.record({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization")})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _file(self, repo: str, rev: str, name: str, body: bool) -> None:
        found = self._resolve(repo, rev)
        if found is None:
            return
        files, sha = found
        hub = self.server.hub
        p = hub.root / repo / name
        if p not in files:
            self._error(404, "EntryNotFound", f"{name} does not exist at {rev}")
            return
        size = p.stat().st_size
        lfs = p.name.endswith(LFS_SUFFIXES)
        start, end = 0, size - 1
        rng = _RANGE.match(self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = min(int(rng.group(2)), size - 1) if rng.group(2) else size - 1
        self.send_response(206 if rng else 200)
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", '"' + digest(p, "sha256" if lfs else "sha1") + '"')
        if lfs:
            self.send_header("X-Linked-Etag", '"' + digest(p, "sha256") + '"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        entry = {"method": self.command, "path": self.path, "file": name, "sent": 0,
                 "range": self.headers.get("Range"), "auth": self.headers.get("Authorization")}
        if body:
            entry["sent"] = self._send(p, start, end + 1, hub.rate if lfs else 0.0)
        hub.record(entry)

    def _send(self, p: Path, start: int, stop: int, rate: float) -> int:
        sent = 0
        chunk = max(1024, int(rate / 20)) if rate else 1 << 20
        with open(p, "rb") as f:
            f.seek(start)
            while start + sent < stop:
                data = f.read(min(chunk, stop - start - sent))
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                except OSError:
                    break
                sent += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        return sent


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], hub: Hub):
        super().__init__(addr, Handler)
        self.hub = hub


class HubProcess:
    """The fake Hub in a child process, so a test can kill it mid-file and start it again on the
    same port: ``with HubProcess(root, rate=...) as hub: env = hub.env(cache)``."""

    def __init__(self, root: Path, rate: float = 0.0, port: int = 0):
        from mlx_supervisor.gateway.testing.server import free_port

        self.root, self.rate = root, rate
        self.port = port or free_port()
        self.log_path = root.parent / f"hub-{self.port}.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, cache: Path) -> dict[str, str]:
        """What a gateway or CLI needs to pull from this hub into ``cache``."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1"}

    def start(self, rate: float | None = None) -> HubProcess:
        if rate is not None:
            self.rate = rate
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_supervisor.gateway.testing.fakehub", str(self.root),
             "--port", str(self.port), "--rate", str(self.rate), "--log", str(self.log_path)],
            stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # it prints its URL once it listens
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def requests(self) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def gets(self, repo: str, file: str) -> list[dict[str, Any]]:
        """The GETs of one file of one repo, in order."""
        return [r for r in self.requests() if r["method"] == "GET" and r.get("file") == file
                and r["path"].startswith(f"/{repo}/resolve/")]

    def __enter__(self) -> HubProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="bytes per second for weight files")
    ap.add_argument("--log", help="append one JSON line per request here")
    args = ap.parse_args(argv)
    hub = Hub(Path(args.root), args.rate, Path(args.log) if args.log else None)
    srv = HubServer(("127.0.0.1", args.port), hub)
    print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
    srv.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
