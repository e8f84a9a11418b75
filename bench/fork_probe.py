"""Does the zygote hold a device context? ``python -m bench.fork_probe`` starts one (as the
gateway does) and asks ``nvidia-smi`` which processes hold a CUDA context; prints one JSON line.

A CUDA context that existed before ``fork`` is unusable in the child, so the zygote must hold
none: this is the check behind ``fork_server`` on CUDA machines.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from typing import Any

from mlx_supervisor.gateway.supervisor.forkserver import ForkServer
from mlx_supervisor.gateway.supervisor.process import worker_env


def _cuda_pids() -> list[int] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout
    return [int(x) for x in out.split() if x.strip().isdigit()]


async def main() -> dict[str, Any]:
    fs = ForkServer(worker_env({}))
    await fs.start()
    hello = await fs.ready(600)
    cuda = _cuda_pids()
    res = {"zygote_pid": hello.pid, "import_s": round(hello.import_seconds, 3),
           "threads": hello.threads, "rss": hello.rss, "cuda_context_pids": cuda,
           "zygote_holds_cuda_context": None if cuda is None else hello.pid in cuda}
    await fs.stop()
    return res


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
