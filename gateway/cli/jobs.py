"""``mlx-supervisor jobs`` and ``mlx-supervisor cancel ID``: the request ledger from a terminal.

They talk HTTP to the running gateway (found as every operational command finds it, through
``gateway/cli/client.py``: the config's host and port, or the pidfile's URL) with the admin key, else
the API key, from the config. Stdlib only, so they work in a bare install.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
PAGE = 1000  # the server's largest page


def add_commands(sub: Any) -> None:
    j = sub.add_parser("jobs", help="recent requests from the request ledger (newest first)")
    j.add_argument("--status", choices=STATUSES, help="only requests in this state")
    j.add_argument("--model", help="only requests for this model id")
    j.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    j.add_argument("--json", action="store_true", help="print the jobs as JSON, one list")
    j.set_defaults(func=jobs_command)

    c = sub.add_parser("cancel", help="cancel a queued or running request by its id")
    c.add_argument("id", help="the request id (the x-request-id header of its response)")
    c.set_defaults(func=cancel_command)


def _call(args: argparse.Namespace, method: str, path: str) -> Any:
    from mlx_supervisor.gateway.cli.client import target

    return target(args).call(method, path, None, 10.0)


def _fail(e: Exception) -> int:
    print(f"mlx-supervisor: {e}", file=sys.stderr)
    return 1


def fetch_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Up to ``--limit`` jobs, following the cursor across pages."""
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(out) < args.limit:
        q = {"limit": str(min(PAGE, args.limit - len(out)))}
        q.update({k: v for k, v in (("status", args.status), ("model", args.model),
                                    ("after", cursor)) if v})
        page = _call(args, "GET", "/v1/jobs?" + urllib.parse.urlencode(q))
        out += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return out


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}ms" if v < 10 else f"{v:.1f}s"


def format_table(jobs: list[dict[str, Any]]) -> str:
    head = ("ID", "MODEL", "STATUS", "RECEIVED", "TTFT", "DURATION", "TOKENS", "ERROR")
    rows = [head]
    for j in jobs:
        u = j["usage"]
        err = (j["error"] or {}).get("message") or ""
        rows.append((j["id"], j["model"], j["status"],
                     time.strftime("%m-%d %H:%M:%S", time.localtime(j["received_at"])),
                     _secs(j["ttft_seconds"]), _secs(j["duration_seconds"]),
                     f"{u['prompt_tokens']}/{u['completion_tokens']}",
                     err if len(err) <= 60 else err[:57] + "..."))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
                     for r in rows).rstrip()


def jobs_command(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.cli.client import GatewayError, NotRunning

    if args.limit < 1:
        return _fail(ValueError("--limit must be at least 1"))
    try:
        jobs = fetch_jobs(args)
    except (GatewayError, NotRunning) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(jobs, indent=2))
    elif jobs:
        print(format_table(jobs))
    else:
        print("no jobs")
    return 0


def cancel_command(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.cli.client import GatewayError, NotRunning

    try:
        job = _call(args, "DELETE", "/v1/jobs/" + urllib.parse.quote(args.id, safe=""))
    except (GatewayError, NotRunning) as e:
        return _fail(e)
    print(f"{job['id']}: {job['status']} after {job['usage']['completion_tokens']} token(s)")
    return 0
