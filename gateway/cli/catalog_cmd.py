"""``mlx-supervisor pull``, ``add`` and ``rm``: the catalog without editing TOML.

With a gateway running they go through its ``/admin`` routes, so the change applies at once
(as a reload does) and a pull is shared with any other client pulling the same repo. With none
running they do the same work here, on the files. Either way ``pull`` draws tqdm bars (one for
the file being fetched, one overall: bytes, rate, ETA) from the pull's events, only when stdout
is a terminal; piped, it prints just the outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OK, FAILED, USAGE, NOT_RUNNING = 0, 1, 2, 3


def add_commands(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the catalog")
    p.add_argument("ref", metavar="REPO[@REVISION]", help="e.g. mlx-community/Qwen2.5-7B-Instruct-4bit")
    p.add_argument("--as", dest="name", metavar="NAME", help="catalog name (default: the repo's name)")
    p.add_argument("--pin", action="store_true", help="pin it: load it now and never evict it")
    p.set_defaults(func=pull_command)

    a = sub.add_parser("add", help="add a local model directory or a cached repo to the catalog")
    a.add_argument("name")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", metavar="DIR", help="a model directory (config.json + safetensors)")
    src.add_argument("--repo", metavar="REPO[@REVISION]", help="a repo in the local Hugging Face cache")
    a.add_argument("--pin", action="store_true", help="pinned: loaded at start, never evicted")
    a.add_argument("--ttl", type=float, metavar="S", help="seconds idle before unload (0 = never)")
    a.set_defaults(func=add_command)

    r = sub.add_parser("rm", help="take a pulled/added model out of the catalog (unloads it first)")
    r.add_argument("name")
    r.add_argument("--delete-files", action="store_true",
                   help="also delete its files from the Hugging Face cache")
    r.set_defaults(func=rm_command)


def _err(msg: str) -> None:
    print(f"mlx-supervisor: {msg}", file=sys.stderr)


def _running(args: argparse.Namespace) -> Any:
    """The Target of a running gateway, else None."""
    from mlx_supervisor.gateway.cli.client import target

    t = target(args)
    found = t.locate()
    if found is None:
        return None
    t.url = found[1]
    return t


def _local_config(args: argparse.Namespace) -> tuple[Any, Path]:
    from mlx_supervisor.gateway.cli.client import config_file
    from mlx_supervisor.shared.config import Config, add_dropins, load

    path = config_file(args)
    if path.exists():
        return load(path), path.parent
    cfg = Config()
    add_dropins(cfg, path.parent)
    return cfg, path.parent


def _guard(fn: Any) -> Any:
    """Turn the shared failures into exit codes: refusals 1, unusable config 2."""
    def run(args: argparse.Namespace) -> int:
        from mlx_supervisor.gateway.cli.client import GatewayError, NotRunning
        from mlx_supervisor.gateway.errors import APIError
        from mlx_supervisor.shared.config import ConfigError

        try:
            rc: int = fn(args)
            return rc
        except ConfigError as e:
            _err(str(e))
            return USAGE
        except (APIError, GatewayError) as e:
            _err(str(getattr(e, "message", e)))
            return FAILED
        except NotRunning as e:
            _err(str(e))
            return NOT_RUNNING
    return run


# ---------------------------------------------------------------- pull


class Bars:
    """tqdm bars drawn from pull events: the current file and the whole pull."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.overall: Any = None
        self.file: Any = None
        self.file_name = ""

    def _bar(self, **kw: Any) -> Any:
        from tqdm import tqdm
        return tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stdout,
                    dynamic_ncols=True, **kw)

    def on(self, ev: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = ev["event"]
        if kind == "started":
            self.overall = self._bar(total=ev["total"], initial=ev["bytes"], position=0,
                                     desc=f"{ev['repo']}")
        elif kind == "progress" and self.overall is not None:
            if ev["file"] != self.file_name:
                if self.file is not None:
                    self.file.close()
                self.file_name = ev["file"]
                self.file = self._bar(total=ev["file_size"], position=1, leave=False,
                                      desc=ev["file"][-40:])
            self.file.update(ev["file_bytes"] - self.file.n)
            self.overall.update(ev["bytes"] - self.overall.n)
        elif kind in ("done", "error"):
            self.close()

    def close(self) -> None:
        for bar in (self.file, self.overall):
            if bar is not None:
                bar.close()
        self.file = self.overall = None


def _sse(resp: Any) -> Iterator[dict[str, Any]]:
    for raw in resp:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            yield json.loads(line[5:])


def _pull_remote(t: Any, body: dict[str, Any], bars: Bars) -> dict[str, Any] | None:
    from mlx_supervisor.gateway.cli.client import _OPENER, GatewayError, _error_message

    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if t.key:
        headers["authorization"] = f"Bearer {t.key}"
    req = urllib.request.Request(t.url + "/admin/models/pull", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        resp = _OPENER.open(req, timeout=120)
    except urllib.error.HTTPError as e:
        raise GatewayError(e.code, _error_message(e.read(), e.code)) from None
    last = None
    pull_id = resp.headers.get("x-pull-id", "")
    try:
        with resp:
            for ev in _sse(resp):
                bars.on(ev)
                last = ev
    except KeyboardInterrupt:
        bars.close()
        _err(f"stopped watching; pull {pull_id} goes on in the gateway "
             f"(cancel it: DELETE {t.url}/admin/pulls/{pull_id})")
        raise SystemExit(FAILED) from None
    return last


def _pull_local(args: argparse.Namespace, repo: str, rev: str | None, bars: Bars) -> dict[str, Any] | None:
    import psutil

    from mlx_supervisor.gateway.models import edit
    from mlx_supervisor.gateway.models.pull import Pull, default_name
    from mlx_supervisor.shared import dropins
    from mlx_supervisor.shared.config import ModelConfig
    from mlx_supervisor.shared.sizes import parse_size

    cfg, cdir = _local_config(args)
    name = args.name or default_name(repo)
    edit.check_name(cfg, cdir, name, repo)
    pull = Pull(repo, rev, parse_size(cfg.memory_budget, psutil.virtual_memory().total),
                cfg.headroom, name, args.pin)

    def finish(p: Pull) -> str:
        assert p.plan is not None
        if edit.check_name(cfg, cdir, name, repo):
            dropins.write(cdir, name, ModelConfig(repo=repo, revision=p.plan.revision, pinned=args.pin))
        return name

    last: list[dict[str, Any]] = []
    pull.listeners += [bars.on, lambda ev: last.append(ev)]
    pull.run(finish)
    return last[-1] if last else None


@_guard
def pull_command(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.models.pull import split_ref

    try:
        repo, rev = split_ref(args.ref)
    except ValueError as e:
        _err(str(e))
        return USAGE
    bars = Bars(enabled=sys.stdout.isatty())
    t = _running(args)
    if t is not None:
        body = {"repo": repo, "revision": rev, "name": args.name, "pin": args.pin}
        last = _pull_remote(t, body, bars)
    else:
        last = _pull_local(args, repo, rev, bars)
    bars.close()
    if last is None or last["event"] != "done":
        _err(last["message"] if last else "the pull ended without an outcome")
        return FAILED
    where = "" if t is not None else " (no gateway running: it is served from the next start)"
    print(f"pulled {repo}@{last['revision'][:12]} as {last['model']}{where}")
    return OK


# ---------------------------------------------------------------- add / rm


@_guard
def add_command(args: argparse.Namespace) -> int:
    import psutil

    from mlx_supervisor.gateway.models import edit
    from mlx_supervisor.gateway.models.pull import split_ref
    from mlx_supervisor.shared import dropins
    from mlx_supervisor.shared.config import ModelConfig

    repo = rev = None
    if args.repo:
        try:
            repo, rev = split_ref(args.repo)
        except ValueError as e:
            _err(str(e))
            return USAGE
    path = str(Path(args.path).expanduser().resolve()) if args.path else None
    t = _running(args)
    if t is not None:
        r = t.post("/admin/models", {"name": args.name, "path": path, "repo": repo, "revision": rev,
                                     "pin": args.pin, "ttl": args.ttl}, timeout=60)
        print(f"added {r['model']} ({r['file']}); the gateway serves it now")
        return OK
    cfg, cdir = _local_config(args)
    model = ModelConfig(path=path, repo=repo, revision=rev, pinned=args.pin, ttl=args.ttl)
    edit.check_add(cfg, cdir, args.name, model, psutil.virtual_memory().total)
    print(f"added {args.name} ({dropins.write(cdir, args.name, model)})")
    return OK


@_guard
def rm_command(args: argparse.Namespace) -> int:
    from mlx_supervisor.gateway.models import edit
    from mlx_supervisor.shared import dropins

    t = _running(args)
    if t is not None:
        q = "?delete_files=true" if args.delete_files else ""
        r = t.call("DELETE", f"/admin/models/{urllib.parse.quote(args.name, safe='')}{q}", None,
                   t.cfg.shutdown_grace + t.cfg.stop_grace + 30)
        print(f"removed {r['model']}" + (f"; {r['files']}" if r.get("files") else ""))
        return OK
    cfg, cdir = _local_config(args)
    model = edit.removable(cfg, cdir, args.name)
    others = {n: m for n, m in cfg.models.items() if n != args.name}
    if args.delete_files:
        edit.check_delete(model, others)
    dropins.remove(cdir, args.name)
    files = "; " + edit.delete_cached(model, others) if args.delete_files else ""
    print(f"removed {args.name}{files}")
    return OK
