"""CPU time per streamed token: gateway process, worker process, and mlx-lm in-process.

Wall-clock decode ratios swing widely on a shared 2-core VM (0.3 to 1.0 for the same code);
CPU seconds per token do not depend on who else holds the cores, so they show where the
gateway path spends its time. ``python -m bench.cpu_per_token [--tokens N]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from mlx_supervisor.gateway.testing.server import ServerProcess

PROMPT = "Once upon a time"
INPROC = f"""
import json, resource, sys, time
import mlx_lm
model, tok = mlx_lm.load(sys.argv[1]); n_max = int(sys.argv[2])
list(mlx_lm.stream_generate(model, tok, {PROMPT!r}, max_tokens=20))
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.time()
n = sum(1 for _ in mlx_lm.stream_generate(model, tok, {PROMPT!r}, max_tokens=n_max))
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
print(json.dumps({{"tokens": n, "wall": time.time() - t0, "cpu": cpu}}))
"""


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def through_gateway(model: Path, tokens: int) -> dict[str, float]:
    with ServerProcess({"lm": {"path": str(model)}}, {"log_level": "WARNING"}) as srv:
        body = {"model": "lm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                "stream": True}
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 20},
                   timeout=120)
        gw, wk = psutil.Process(srv.proc.pid), psutil.Process(srv.worker_pids()[0])
        g0, w0, t0 = _cpu(gw), _cpu(wk), time.time()
        n = 0
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=300) as r:
            n = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        wall = time.time() - t0
        return {"tokens": n, "wall": wall, "gateway_cpu": _cpu(gw) - g0, "worker_cpu": _cpu(wk) - w0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=800)
    args = ap.parse_args()
    model = Path(tempfile.mkdtemp(prefix="mlxsup-bench-")) / "lm"
    subprocess.run([sys.executable, "-m", "mlx_supervisor.worker.demo.lm", str(model)], check=True)
    g = through_gateway(model, args.tokens)
    out = subprocess.run([sys.executable, "-c", INPROC, str(model), str(args.tokens)], check=True,
                         capture_output=True, text=True).stdout
    i = json.loads(out.strip().splitlines()[-1])
    us = 1e6
    report = {
        "gateway_tokens_per_s": g["tokens"] / g["wall"],
        "inproc_tokens_per_s": i["tokens"] / i["wall"],
        "gateway_cpu_us_per_token": g["gateway_cpu"] / g["tokens"] * us,
        "worker_cpu_us_per_token": g["worker_cpu"] / g["tokens"] * us,
        "inproc_cpu_us_per_token": i["cpu"] / i["tokens"] * us,
    }
    report["cpu_ratio_inproc_over_gateway_path"] = report["inproc_cpu_us_per_token"] / (
        report["gateway_cpu_us_per_token"] + report["worker_cpu_us_per_token"])
    print(json.dumps({k: round(v, 3) for k, v in report.items()}, indent=2))


if __name__ == "__main__":
    main()
