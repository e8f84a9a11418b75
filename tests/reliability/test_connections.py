"""Connection attacks, each bounded in count and time, on a real gateway on loopback: idle
connections, heads and bodies that never end, huge headers, a flood of idle connections under
a small open-files limit, the connection cap, and JSON nested too deep to decode."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from mlx_supervisor.gateway.testing.server import ServerProcess

from ._kit import chat_body, fake

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
SETTINGS = {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT}


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    with ServerProcess({"fake": fake(FAKE_TOKEN_DELAY=0.05)}, SETTINGS) as s:
        yield s
    assert s.orphans == []


def _connect(srv: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    s.setblocking(False)
    return s


def _closed(s: socket.socket) -> bool:
    """The server closed (or reset) this connection; what it sent first is read and dropped."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def _wait_closed(socks: list[socket.socket], timeout: float) -> tuple[int, float]:
    """How many of ``socks`` the server closed within ``timeout``, and when the last one went."""
    t0 = time.monotonic()
    open_ = list(socks)
    last = 0.0
    while open_ and time.monotonic() - t0 < timeout:
        ready, _, _ = select.select(open_, [], [], 0.2)
        for s in ready:
            if _closed(s):
                open_.remove(s)
                last = time.monotonic() - t0
    return len(socks) - len(open_), last


def _answer(s: socket.socket, timeout: float) -> bytes:
    s.setblocking(True)
    s.settimeout(timeout)
    out = b""
    with contextlib.suppress(ConnectionError, TimeoutError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_idle_connections_are_closed_within_header_timeout(srv: ServerProcess) -> None:
    """500 connections that never send a byte: every one is closed by header_timeout (plus
    scheduling slack), and the gateway keeps answering meanwhile."""
    socks = [_connect(srv) for _ in range(500)]
    try:
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        closed, last = _wait_closed(socks, HEADER_TIMEOUT + 10)
        assert closed == 500, f"only {closed} of 500 idle connections closed"
        assert last < HEADER_TIMEOUT + 10
    finally:
        for s in socks:
            s.close()


def test_a_head_sent_byte_by_byte_is_cut_at_header_timeout(srv: ServerProcess) -> None:
    s = _connect(srv)
    t0 = time.monotonic()
    try:
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            if _closed(s):
                break
            with contextlib.suppress(OSError):
                s.send(bytes([b]))
            time.sleep(0.2)
            if time.monotonic() - t0 > HEADER_TIMEOUT + 10:
                break
        head = _answer(s, HEADER_TIMEOUT + 5)
        assert head.startswith(b"HTTP/1.1 408") or head == b"", head[:200]
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 10
    finally:
        s.close()


def test_endless_chunked_uploads_get_408_within_body_timeout(srv: ServerProcess) -> None:
    socks = [_connect(srv) for _ in range(5)]
    try:
        for s in socks:
            s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        t0 = time.monotonic()
        answers = [_answer(s, BODY_TIMEOUT + 10) for s in socks]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:80] for a in answers]
        assert time.monotonic() - t0 < BODY_TIMEOUT + 10
    finally:
        for s in socks:
            s.close()
    assert "Traceback" not in srv.log()


def test_headers_over_the_limit_are_431(srv: ServerProcess) -> None:
    s = _connect(srv)
    try:
        s.setblocking(True)
        with contextlib.suppress(OSError):  # the server may close before reading it all
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        assert _answer(s, 10).startswith(b"HTTP/1.1 431")
    finally:
        s.close()
    ok = httpx.get(srv.url + "/health", headers={"X-Fine": "a" * 8000}, timeout=10)
    assert ok.status_code == 200


def test_json_nested_too_deep_is_400_and_logged_once_without_a_traceback(srv: ServerProcess) -> None:
    before = len(srv.log_path.read_text(errors="replace"))
    deep = b"[" * 10_000 + b"]" * 10_000
    for path, body in (("/v1/chat/completions", b'{"model": "fake", "messages": [], "junk": ' + deep + b"}"),
                       ("/v1/completions", b'{"model": "fake", "prompt": "x", "extra": ' + deep + b"}"),
                       ("/v1/embeddings", b'{"model": "fake", "input": "x", "x": {"a": ' + deep + b"}}"),
                       ("/admin/models/fake/load", b'{"junk": ' + b"[" * 1500 + b"]" * 1500 + b"}")):
        r = httpx.post(srv.url + path, content=body, timeout=30)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == "invalid_json" and "nested too deeply" in err["message"], err
    log = srv.log_path.read_text(errors="replace")[before:]
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    assert log.count("POST /v1/chat/completions 400") == 1


def test_an_idle_flood_under_a_small_fd_limit_keeps_health_answering() -> None:
    """The gateway starts with 256 open files (soft and hard): it fits its connection cap under
    that, and 1000 idle connections (beyond the cap and the limit) never stop /health: each new
    connection past the cap closes the oldest idle one. All are closed within header_timeout."""
    limits = {resource.RLIMIT_NOFILE: (256, 256)}
    with ServerProcess({"fake": fake()}, SETTINGS, rlimits=limits) as srv:
        assert "max_connections lowered from 1000" in srv.log()
        socks: list[socket.socket] = []
        failures = 0
        try:
            for i in range(1000):
                with contextlib.suppress(OSError):
                    socks.append(_connect(srv))
                if i % 100 == 99:
                    try:
                        ok = httpx.get(srv.url + "/health", timeout=10).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    failures += not ok
            assert failures == 0, f"/health failed {failures} of 10 times under the flood"
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("fake"), timeout=30)
            assert r.status_code == 200, r.text
            closed, _ = _wait_closed(socks, HEADER_TIMEOUT + 15)
            assert closed == len(socks), f"{len(socks) - closed} of {len(socks)} still open"
            conns = httpx.get(srv.url + "/health", timeout=10).json()["connections"]
            assert conns["max"] < 256 and conns["closed_idle_for_room"] > 0, conns
            metrics = httpx.get(srv.url + "/metrics", timeout=10).text
            assert "mlx_supervisor_connections_closed_idle_for_room_total" in metrics
        finally:
            for s in socks:
                s.close()
        assert "Too many open files" not in srv.log()
    assert srv.orphans == []


def test_past_the_connection_cap_with_every_connection_busy_is_503() -> None:
    """Four connections each streaming a long answer fill max_connections = 4: a fifth gets
    503 at once (nothing idle to close); once one stream ends, new connections are served."""
    with ServerProcess({"slow": fake(FAKE_TOKEN_DELAY=0.05)}, {**SETTINGS, "max_connections": 4}) as srv:
        streams: list[socket.socket] = []
        body = b'{"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": true}'
        try:
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert s.recv(100).startswith(b"HTTP/1.1 200")
                streams.append(s)
            extra = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            assert _answer(extra, 10).startswith(b"HTTP/1.1 503")
            extra.close()
            streams.pop().close()
            deadline = time.monotonic() + 20
            status = 0
            while time.monotonic() < deadline and status != 200:
                with contextlib.suppress(httpx.HTTPError):
                    status = httpx.get(srv.url + "/health", timeout=5).status_code
                time.sleep(0.1)
            assert status == 200
        finally:
            for s in streams:
                s.close()
