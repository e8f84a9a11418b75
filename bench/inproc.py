"""In-process baselines, each run in a fresh process by the bench runner (which never imports mlx).

``python -m bench.inproc info`` | ``build DIR --seed N --size tiny|large`` |
``decode DIR --max-tokens N --reps R --mode stream|batch|engine [--serve]`` | ``cold DIR`` |
``swap DIR DIR DIR --trace T --max-tokens N --slots K`` | ``fake --n N``. Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _info() -> dict[str, Any]:
    from importlib.metadata import version

    import mlx.core as mx

    return {"mlx": version("mlx"), "mlx_lm": version("mlx-lm"), "device": str(mx.default_device())}


def _build(d: Path, seed: int, size: str) -> dict[str, Any]:
    from bench.common import LARGE
    from mlx_supervisor.worker.demo import lm as demo_model
    marker = d / ".bench-complete"
    if marker.exists():
        return {"path": str(d), "built": False}
    if d.exists():
        shutil.rmtree(d)
    t0 = time.monotonic()
    if size == "tiny":
        demo_model.build(d, seed=seed)
    else:
        demo_model.build(d, seed=seed, **LARGE)
        _quantize(d, bits=4)
    marker.write_text("ok\n")
    return {"path": str(d), "built": True, "seconds": round(time.monotonic() - t0, 2)}


def _quantize(d: Path, bits: int, group_size: int = 64) -> None:
    """Quantize a built model in place with ``mlx.nn.quantize`` (as ``mlx_lm.convert -q`` does)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx.utils import tree_flatten

    loaded: Any = mlx_lm.load(str(d))
    model = loaded[0]
    nn.quantize(model, group_size=group_size, bits=bits)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization"] = {"group_size": group_size, "bits": bits}
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _serve_decode(d: Path, max_tokens: int, prompt: str, mode: str) -> None:
    """Loaded and warmed, then one timed run per line read from stdin, one JSON line each: the
    bench alternates these runs with the gateway's, so both sides see the same machine."""
    import sys

    loop = LOOPS[mode](d, prompt, max_tokens)
    loop()
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(_timed(loop)), flush=True)


def _decode(d: Path, max_tokens: int, reps: int, prompt: str, mode: str) -> dict[str, Any]:
    """One single-stream greedy decode loop, ``reps`` timed runs after a warm-up; tokens/s
    between the first and the last token. Modes: ``stream`` (``mlx_lm.stream_generate``, the
    issue's baseline), ``batch`` (``BatchGenerator`` alone) and ``engine`` (the lm worker's own
    ``LMEngine``, submit/step, text and chunks included, before any socket)."""
    loop = LOOPS[mode](d, prompt, max_tokens)
    loop()  # warm-up
    runs = [_timed(loop) for _ in range(reps)]
    rates = sorted(r["tps"] for r in runs)
    ttfts = sorted(r["ttft_s"] for r in runs)
    return {"mode": mode, "decode_tps": rates[len(rates) // 2],
            "decode_tps_all": [round(r["tps"], 1) for r in runs],
            "ttft_s": ttfts[len(ttfts) // 2], "tokens": runs[-1]["tokens"]}


def _timed(loop: Loop) -> dict[str, Any]:
    t0 = time.perf_counter()
    stamps = loop()
    return {"tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "ttft_s": stamps[0] - t0,
            "tokens": len(stamps)}


Loop = Callable[[], list[float]]


def _load(d: Path) -> tuple[Any, Any]:
    import mlx_lm

    loaded: Any = mlx_lm.load(str(d))
    return loaded[0], loaded[1]


def _stream_run(d: Path, prompt: str, max_tokens: int) -> Loop:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tok = _load(d)
    greedy = make_sampler(temp=0.0)

    def loop() -> list[float]:
        return [time.perf_counter() for _ in mlx_lm.stream_generate(
            model, tok, prompt, max_tokens=max_tokens, sampler=greedy)]

    return loop


def _batch_run(d: Path, prompt: str, max_tokens: int) -> Loop:
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    model, tok = _load(d)
    gen = BatchGenerator(model)
    ids, greedy = list(tok.encode(prompt)), make_sampler(temp=0.0)

    def loop() -> list[float]:
        (uid,) = gen.insert([ids], max_tokens=[max_tokens], samplers=[greedy])
        stamps: list[float] = []
        while True:
            for r in gen.next()[1]:
                if r.uid == uid:
                    stamps.append(time.perf_counter())
                    if r.finish_reason is not None:
                        return stamps

    return loop


def _engine_run(d: Path, prompt: str, max_tokens: int) -> Loop:
    from mlx_supervisor.shared.protocol import Chunk, Error, Generate
    from mlx_supervisor.worker.engines.lm import LMEngine

    eng = LMEngine()
    eng.load(str(d))
    n = itertools.count()

    def loop() -> list[float]:
        stamps: list[float] = []

        def emit(m: Any) -> None:
            if isinstance(m, Chunk):
                stamps.extend([time.perf_counter()] * m.tokens)
            elif isinstance(m, Error):
                raise RuntimeError(m.message)

        eng.submit(Generate(id=f"d{next(n)}", prompt=prompt, max_tokens=max_tokens,
                            temperature=0.0), emit)
        while eng.has_work():
            eng.step(emit)
        return stamps

    return loop


LOOPS: dict[str, Callable[[Path, str, int], Loop]] = {
    "stream": _stream_run, "batch": _batch_run, "engine": _engine_run}


def _cold(d: Path, prompt: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    t1 = time.perf_counter()
    loaded: Any = mlx_lm.load(str(d))
    t2 = time.perf_counter()
    for _ in mlx_lm.stream_generate(loaded[0], loaded[1], prompt, max_tokens=1,
                                    sampler=make_sampler(temp=0.0)):
        break
    t3 = time.perf_counter()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2,
            "load_first_token_s": t3 - t1}


def _swap(dirs: dict[str, Path], trace: str, max_tokens: int, slots: int, prompt: str
          ) -> dict[str, Any]:
    """The swap floor: imports done, then the trace served in this process, ``slots`` models
    kept (LRU), a miss loads with ``mlx_lm.load`` and frees the least recently used."""
    from collections import OrderedDict

    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    hot: OrderedDict[str, Any] = OrderedDict()
    loads = 0
    t0 = time.perf_counter()
    for m in trace:
        if m in hot:
            hot.move_to_end(m)
        else:
            while len(hot) >= slots:
                hot.popitem(last=False)
                mx.clear_cache()
            hot[m] = mlx_lm.load(str(dirs[m]))
            loads += 1
        model, tok = hot[m][0], hot[m][1]
        mlx_lm.generate(model, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0))
    return {"wall_s": time.perf_counter() - t0, "loads": loads}


def _fake(n: int) -> dict[str, Any]:
    """The fake worker's own time for one max_tokens=1 request: submit, one step, Done."""
    from mlx_supervisor.shared.protocol import Generate, encode
    from mlx_supervisor.worker.engines.fake import FakeEngine

    eng = FakeEngine()
    eng.load("")
    times = []
    out: list[bytes] = []
    for i in range(n):
        msg = Generate(id=f"r{i}", prompt="hello world", max_tokens=1, temperature=0.0)
        t0 = time.perf_counter()
        eng.submit(msg, lambda m: out.append(encode(m)))
        while eng.has_work():
            eng.step(lambda m: out.append(encode(m)))
        times.append(time.perf_counter() - t0)
        out.clear()
    times.sort()
    return {"p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def main(argv: list[str] | None = None) -> int:
    from bench.common import PROMPT

    ap = argparse.ArgumentParser(prog="python -m bench.inproc")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    b = sub.add_parser("build")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", choices=["tiny", "large"], default="tiny")
    de = sub.add_parser("decode")
    de.add_argument("dir")
    de.add_argument("--max-tokens", type=int, default=256)
    de.add_argument("--reps", type=int, default=3)
    de.add_argument("--mode", choices=["stream", "batch", "engine"], default="stream")
    de.add_argument("--serve", action="store_true", help="one run per stdin line")
    c = sub.add_parser("cold")
    c.add_argument("dir")
    sw = sub.add_parser("swap")
    sw.add_argument("dirs", nargs=3)
    sw.add_argument("--trace", default="abacbcabcaab")
    sw.add_argument("--max-tokens", type=int, default=8)
    sw.add_argument("--slots", type=int, default=2)
    f = sub.add_parser("fake")
    f.add_argument("--n", type=int, default=2000)
    a = ap.parse_args(argv)
    if a.cmd == "info":
        res = _info()
    elif a.cmd == "build":
        res = _build(Path(a.dir), a.seed, a.size)
    elif a.cmd == "decode" and a.serve:
        _serve_decode(Path(a.dir), a.max_tokens, PROMPT, a.mode)
        return 0
    elif a.cmd == "decode":
        res = _decode(Path(a.dir), a.max_tokens, a.reps, PROMPT, a.mode)
    elif a.cmd == "cold":
        res = _cold(Path(a.dir), PROMPT)
    elif a.cmd == "swap":
        res = _swap(dict(zip("abc", map(Path, a.dirs), strict=True)), a.trace, a.max_tokens,
                    a.slots, PROMPT)
    else:
        res = _fake(a.n)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
