"""Smoke test for ``python -m bench``: the smallest path (gateway alone, fake worker) runs end to
end and writes a report with the expected keys and positive numbers. No timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_gateway_alone_smoke(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--smoke", "--only", "gateway_alone",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"command", "machine", "benches", "seconds"} <= set(report)
    assert report["machine"]["cpus"] >= 1
    sec = report["benches"]["gateway_alone"]
    assert "error" not in sec
    figs = {f["figure"]: f for f in sec["figures"]}
    assert len(figs) == 4
    for f in figs.values():
        assert {"value", "baseline", "ratio", "unit", "better", "baseline_name"} <= set(f)
        assert f["baseline"] > 0
    tps = next(f for name, f in figs.items() if "tokens/s" in name)
    assert tps["value"] > 0 and tps["ratio"] > 0
    assert sec["details"]["total_tokens"] == 4 * 20
    assert sec["details"]["ttfb_ms"]["p50"] > 0
    assert "gateway alone" in (tmp_path / "report.md").read_text()


def test_bench_decode_smoke(tmp_path: Path) -> None:
    """The decode bench on the real tiny model: paired runs through the gateway and in-process."""
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--smoke", "--only", "decode",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sec = json.loads((tmp_path / "report.json").read_text())["benches"]["decode"]
    assert "error" not in sec, sec
    assert len(sec["figures"]) == 5 and all(f["value"] > 0 and f["baseline"] > 0
                                            for f in sec["figures"])
    d = sec["details"]
    assert len(d["gateway_tps_all"]) == len(d["inproc_tps_all"]) == len(d["pair_ratios"]) == 2


def test_bench_grammar_smoke(tmp_path: Path) -> None:
    """The grammar bench on the real tiny model: json_schema vs none, 1 and 16 streams; tools
    with tool_choice auto (no call opened) vs none, 1 and 16 streams."""
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--smoke", "--only", "grammar",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sec = json.loads((tmp_path / "report.json").read_text())["benches"]["grammar"]
    assert "error" not in sec, sec["error"]
    assert [f["target"] for f in sec["figures"]] == [">= 0.9", ">= 0.9", None, None,
                                                     ">= 0.95", ">= 0.95"]
    assert all(f["value"] > 0 and f["baseline"] > 0 for f in sec["figures"])
