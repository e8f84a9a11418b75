"""Scale-out behind a standard router (docs/SCALING.md): two real supervisors on two loopback
ports behind a real nginx (Debian's package), round-robin, both serving both models; stopping
one fails over to the other through nginx's own settings."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from mlx_supervisor.gateway.testing.server import ServerProcess, free_port

DOCS = Path(__file__).resolve().parent.parent / "docs" / "SCALING.md"


def nginx_binary() -> str:
    """Debian's nginx; installed here when missing (tests run as root on a clean machine)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx"], check=True, env=env, timeout=600)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_conf(prefix: Path, port: int, backends: list[int]) -> str:
    """The upstream block of docs/SCALING.md, with every path inside ``prefix``."""
    servers = "\n".join(f"    server 127.0.0.1:{b} max_fails=1 fail_timeout=10s;" for b in backends)
    temps = "\n".join(f"  {k}_temp_path {prefix}/{k};"
                      for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {prefix}/access.log;
{temps}
  upstream mlx_supervisors {{
{servers}
    keepalive 8;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://mlx_supervisors;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Request-Id $request_id;
      proxy_buffering off;
      proxy_read_timeout 600s;
      proxy_connect_timeout 2s;
      proxy_next_upstream error timeout http_503 non_idempotent;
      proxy_next_upstream_tries 2;
    }}
  }}
}}
"""


@contextlib.contextmanager
def nginx(backends: list[int]) -> Iterator[str]:
    binary = nginx_binary()
    prefix = Path(tempfile.mkdtemp(prefix="nginx-", dir="/tmp"))
    port = free_port()
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read our 0700 tmp dir
    conf.write_text(user + nginx_conf(prefix, port, backends))
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"nginx did not start: {err}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # master and its workers: one process group
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind
        shutil.rmtree(prefix, ignore_errors=True)


def served(url: str) -> float:
    """Requests this supervisor finished, from its own /metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("mlx_supervisor_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0})


def test_two_supervisors_behind_nginx_round_robin_and_fail_over(demo_model_dir: Path) -> None:
    assert "proxy_next_upstream error timeout http_503 non_idempotent" in DOCS.read_text()
    models = {"alpha": {"path": str(demo_model_dir)}, "beta": {"path": str(demo_model_dir)}}
    with ServerProcess(models, settings={"shutdown_grace": 2.0}) as a, \
            ServerProcess(models, settings={"shutdown_grace": 2.0}) as b, \
            nginx([a.port, b.port]) as lb:
        for s in (a, b):
            assert httpx.get(s.url + "/health/ready", timeout=5).status_code == 200

        # Round-robin: both supervisors serve, each model is answered.
        for model in ("alpha", "beta"):
            r = complete(lb, model)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
        assert served(a.url) == 1 and served(b.url) == 1

        # One supervisor goes away: nginx retries the other (error -> next upstream), marks the
        # dead one down for fail_timeout, and every request is still answered.
        a.stop()
        t0 = time.monotonic()
        for model in ("alpha", "beta", "alpha", "beta"):
            r = complete(lb, model)
            assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 60
        assert served(b.url) == 5
        assert not a.orphans
