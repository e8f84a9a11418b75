"""Security: loopback by default, no public bind without a key, constant-time key checks, a
separate admin key, a private run directory, foreign ZeroMQ peers dropped, no secrets in
workers' environments."""

from __future__ import annotations

import hmac
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psutil
import pytest
import zmq

from mlx_supervisor.gateway.api import app as app_module
from mlx_supervisor.gateway.testing.server import ServerProcess, free_port, write_config
from mlx_supervisor.shared import protocol as p
from mlx_supervisor.shared.config import Config

from ._kit import alive, auth, chat_body, fake, hot, log_has, wait_for

API_KEY, ADMIN_KEY = "sk-api-7f3e", "sk-admin-91c2"
SECRETS = {"MY_API_KEY": "secret", "OPENAI_API_KEY": "x", "HF_TOKEN": "hf_x", "DB_PASSWORD": "pw"}


def _listening(pid: int) -> set[str]:
    proc = psutil.Process(pid)
    conns = proc.net_connections(kind="inet") if hasattr(proc, "net_connections") else proc.connections("inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A gateway with an API key and an admin key, started from a config that names no host,
    with secrets in its environment and a run dir that was created world-readable."""
    work = tmp_path_factory.mktemp("sec")
    (work / "run").mkdir(mode=0o755)
    os.chmod(work / "run", 0o755)
    s = ServerProcess({"m": fake()}, {"api_key": API_KEY, "admin_key": ADMIN_KEY}, workdir=work,
                      env=SECRETS)
    s.config.write_text("\n".join(ln for ln in s.config.read_text().splitlines()
                                  if not ln.startswith("host =")) + "\n")
    with s:
        r = httpx.post(s.url + "/v1/chat/completions", json=chat_body("m"), headers=auth(API_KEY), timeout=30)
        assert r.status_code == 200
        yield s
    assert s.orphans == []


def test_binds_loopback_by_default(srv: ServerProcess) -> None:
    assert Config().host == "127.0.0.1"
    assert "host" not in srv.config.read_text()
    assert srv.proc is not None and _listening(srv.proc.pid) == {"127.0.0.1"}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_refuses_a_public_bind_without_an_api_key(tmp_path: Path, host: str) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "config.toml", {"port": port, "run_dir": str(tmp_path / "run")},
                       {"m": fake()})
    r = subprocess.run([sys.executable, "-m", "mlx_supervisor.gateway.cli", "--config", str(cfg),
                        "serve", "--host", host], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MLX_SUPERVISOR_DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"refusing to listen on {host} without an api_key" in r.stderr
    assert "--insecure-no-auth" in r.stderr
    assert not (tmp_path / "run" / "gateway.pid").exists()


def test_insecure_no_auth_allows_a_public_bind() -> None:
    with ServerProcess({"m": fake()}, {"host": "0.0.0.0"}, extra_args=["--insecure-no-auth"]) as s:
        assert s.proc is not None and _listening(s.proc.pid) == {"0.0.0.0"}
        # Talk to it on loopback only.
        r = httpx.post(s.url + "/v1/chat/completions", json=chat_body("m"), timeout=30)
        assert r.status_code == 200
    assert s.orphans == []


def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    mw = app_module.GatewayMiddleware(None, SimpleNamespace(cfg=Config(api_key="k1", admin_key="a1")))
    assert mw._auth("/v1/models", {b"authorization": b"Bearer k1"}) is None
    assert calls == [(b"k1", b"k1")]
    for headers in ({b"authorization": b"Bearer k2"}, {b"x-api-key": b"k"}, {b"authorization": b"Bearer \xe9"},
                    {b"authorization": b"Bearer a1"}):
        err = mw._auth("/v1/models", headers)
        assert err is not None and err.status == 401
    assert mw._auth("/admin/ps", {b"x-api-key": b"a1"}) is None
    assert mw._auth("/admin/ps", {b"authorization": b"Bearer k1"}) is not None
    assert mw._auth("/v1/models", {}) is not None and len(calls) == 7  # no key: nothing compared
    assert mw._auth("/health", {}) is None


def test_admin_routes_take_the_admin_key_only(srv: ServerProcess) -> None:
    def get(path: str, key: str | None) -> int:
        return httpx.get(srv.url + path, headers=auth(key), timeout=10).status_code

    assert get("/admin/ps", API_KEY) == 401
    assert get("/admin/ps", None) == 401
    assert get("/admin/ps", ADMIN_KEY) == 200
    assert httpx.post(srv.url + "/admin/models/m/unload", headers=auth(API_KEY), timeout=10).status_code == 401
    assert get("/v1/models", API_KEY) == 200
    assert get("/v1/models", ADMIN_KEY) == 401
    assert get("/v1/models", None) == 401
    assert get("/health", None) == 200


def test_run_dir_is_private_and_holds_the_socket(srv: ServerProcess) -> None:
    run = srv.workdir / "run"
    st = run.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)  # it was created 0755
    assert st.st_uid == os.getuid()
    assert srv.proc is not None
    sock = run / f"gw-{srv.proc.pid}.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)


def test_a_message_from_an_unknown_routing_id_is_dropped(srv: ServerProcess) -> None:
    assert srv.proc is not None
    before = hot(srv, ADMIN_KEY)
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, b"m#999")
        s.connect(f"ipc://{srv.workdir / 'run' / f'gw-{srv.proc.pid}.sock'}")
        ready = p.Ready(pid=os.getpid(), kind="lm", load_seconds=0.0,
                        memory=p.Memory(active=10**13, cache=0, peak=0, rss=0))
        for frames in ([b"\x00garbage\xff"], [p.encode(ready)], [p.encode(p.Hello(pid=os.getpid()))],
                       [p.encode(p.Chunk(id="req-x", text="spoofed"))], [b"a", b"b"]):
            s.send_multipart(frames)
        wait_for(lambda: log_has(srv, "dropped a message from unknown routing id"), timeout=10)
        wait_for(lambda: log_has(srv, "dropped a frame with 3 parts"), timeout=10)
        s.close()
    finally:
        ctx.term()
    assert httpx.get(srv.url + "/health", timeout=10).json()["status"] == "ok"
    after = hot(srv, ADMIN_KEY)
    assert {m: (w["pid"], w["charged_bytes"]) for m, w in after.items()} == \
        {m: (w["pid"], w["charged_bytes"]) for m, w in before.items()}
    assert len(after) == 1 and alive(after["m"]["pid"])
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat_body("m"), headers=auth(API_KEY), timeout=30)
    assert r.status_code == 200 and "spoofed" not in r.text


def test_workers_do_not_inherit_secrets(srv: ServerProcess) -> None:
    assert srv.proc is not None

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)

    gateway_env = environ(srv.proc.pid)
    assert all(gateway_env.get(k) == v for k, v in SECRETS.items())  # the test is meaningful
    pids = srv.worker_pids()
    assert pids
    for pid in pids:
        env = environ(pid)
        leaked = sorted(set(env) & set(SECRETS))
        assert not leaked, leaked
        assert env["FAKE_MEMORY_BYTES"]  # the model's own env still arrives
        assert API_KEY not in "".join(env.values()) and ADMIN_KEY not in "".join(env.values())


def test_metrics_need_a_key_when_one_is_set_unless_public(srv: ServerProcess) -> None:
    assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(srv.url + "/metrics", headers=auth("wrong"), timeout=10).status_code == 401
    for key in (API_KEY, ADMIN_KEY):
        r = httpx.get(srv.url + "/metrics", headers=auth(key), timeout=10)
        assert r.status_code == 200 and "mlx_supervisor_" in r.text
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # probes stay public
    with ServerProcess({"m": fake()}, {"api_key": API_KEY, "public_metrics": True}) as pub:
        assert httpx.get(pub.url + "/metrics", timeout=10).status_code == 200
