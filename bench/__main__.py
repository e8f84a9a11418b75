"""``python -m bench [--quick] [--out DIR] [--only NAME ...] [--model-size tiny|large]``

Runs the benchmarks one after another (never two at once: they share the CPUs) and writes
``report.json`` and ``report.md`` into ``--out`` (default ``bench/out/``). Every figure is the
gateway's number ÷ a baseline measured in the same run; see bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import ROOT, Settings, machine
from bench.suites import SUITES


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "" if v is None else str(v)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# mlx-supervisor bench ({'quick' if report['quick'] else 'full'}, model {report['model_size']})",
             "",
             f"`{report['command']}` on {m.get('lscpu_model_name', '?')}, {m.get('cpus')} CPUs, "
             f"{m.get('memory_gb')} GB, mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}, "
             f"device {m.get('device')}, python {m.get('python')}; {report['seconds']:.0f} s.",
             "",
             "Ratio = gateway ÷ baseline (both measured in this run); `better` says which way is good.",
             "",
             "| bench | figure | gateway | baseline | unit | ratio | better | baseline is | target | pass |",
             "|---|---|---:|---:|---|---:|---|---|---|---|"]
    for name, sec in report["benches"].items():
        if sec.get("error"):
            lines.append(f"| {name} | FAILED: {sec['error'].splitlines()[-1][:120]} | | | | | | | | |")
            continue
        for f in sec.get("figures", []):
            extra = f" (overhead {f['overhead_ms']} ms)" if "overhead_ms" in f else ""
            passed = {True: "PASS", False: "FAIL", None: ""}[f.get("pass")]
            lines.append(f"| {name} | {f['figure']}{extra} | {_fmt(f['value'])} | {_fmt(f['baseline'])} | "
                         f"{f['unit']} | {f['ratio']:.3f} | {f['better']} | {f['baseline_name']} | "
                         f"{f.get('target') or ''} | {passed} |")
    return "\n".join(lines) + "\n"


def _write(report: dict[str, Any], out: Path, t0: float) -> str:
    report["seconds"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "report.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (~3 min)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="report directory")
    ap.add_argument("--only", nargs="+", choices=list(SUITES), metavar="NAME",
                    help=f"run only these: {', '.join(SUITES)}")
    ap.add_argument("--model-size", choices=["tiny", "large"], default="tiny",
                    help="tiny: the demo llama; large: a generated 4-bit llama (hidden 2048, 16 layers)")
    ap.add_argument("--models-dir", default=None,
                    help="where bench models are built and cached (default OUT/models)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: smallest sizes
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(quick=a.quick, out=out, model_size=a.model_size,
                 models_dir=Path(a.models_dir) if a.models_dir else out / "models", smoke=a.smoke)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    report: dict[str, Any] = {"command": command.strip(), "quick": a.quick, "model_size": a.model_size,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                              "benches": {}}
    for name in a.only or list(SUITES):
        t1 = time.monotonic()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        load = [round(x, 2) for x in os.getloadavg()]
        try:
            sec = SUITES[name](s)
        except Exception:
            sec = {"error": traceback.format_exc(), "figures": []}
        if sec is None:
            print(f"[bench] {name}: not present, skipped", file=sys.stderr, flush=True)
            continue
        sec["seconds"] = round(time.monotonic() - t1, 1)
        sec["loadavg_at_start"] = load
        report["benches"][name] = sec
        for f in sec.get("figures", []):
            print(f"[bench]   {f['figure']}: {_fmt(f['value'])} vs {_fmt(f['baseline'])} {f['unit']} "
                  f"-> ratio {f['ratio']:.3f}", file=sys.stderr, flush=True)
        if sec.get("error"):
            print(f"[bench] {name} FAILED:\n{sec['error']}", file=sys.stderr, flush=True)
        md = _write(report, out, t0)  # after every bench: a run cut short still leaves a report
    md = _write(report, out, t0)
    print(md)
    return 1 if any(sec.get("error") for sec in report["benches"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
