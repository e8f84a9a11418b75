"""The status page's charts (the history ring and its live samples), pull form and playground, in
real headless Chromium against a real gateway, a fake Hub and the real tiny llama."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.api.run import Outcome
from mlx_supervisor.gateway.observe.history import History
from mlx_supervisor.gateway.testing.browser import color_share, status_page
from mlx_supervisor.gateway.testing.cli import fake
from mlx_supervisor.gateway.testing.fakehub import HubProcess
from mlx_supervisor.gateway.testing.server import ServerProcess, wait_for
from mlx_supervisor.shared.config import Config

BLUE = (0x2E, 0x6F, 0xDB)  # PALETTE[0] in charts.js: the first model's series


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("hub") / "repos"
    for name in ("tiny-llama", "other-llama"):
        shutil.copytree(demo_model_dir, root / "test-org" / name)
    return root


def chat(url: str, model: str) -> None:
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    assert r.status_code == 200, r.text


async def test_history_counts_tokens_as_they_stream_and_requests_as_they_finish(tmp_path: Path) -> None:
    gw = Gateway.build(Config(), {}, {}, 10**9, f"ipc://{tmp_path}/gw.sock")
    try:
        sent: list[dict[str, Any]] = []
        hist = History(gw, sent.append, interval=2.0, window=6.0)
        o = Outcome(request_id="r1", model="m", route="chat")
        gw.observe("started", o)
        o.completion_tokens = 10  # streamed so far (the Run updates its Outcome per chunk)

        def sample_after(seconds: float) -> dict[str, Any]:
            hist._last = time.monotonic() - seconds
            return hist.sample()

        s1 = sample_after(1.0)
        assert 9.5 < s1["rates"]["m"]["tps"] <= 10 and s1["rates"]["m"]["rps"] == 0
        o.completion_tokens = 15
        gw.observe("finished", o)
        s2 = sample_after(1.0)
        assert 4.5 < s2["rates"]["m"]["tps"] <= 5 and 0.9 < s2["rates"]["m"]["rps"] <= 1  # 5 more, not 15
        assert sample_after(1.0)["rates"] == {}  # nothing since
        for _ in range(3):
            sample_after(1.0)
        assert len(hist.samples) == 3 and hist.document()["window"] == 6.0  # a ring: oldest out
        assert s1["budget"] == 10**9 and s1["memory"] == {} and s1["queued"] == {}
    finally:
        await gw.sup.transport.close()


def test_history_ring_records_rates_memory_and_budget() -> None:
    with ServerProcess({"alpha": fake()}, {"memory_budget": "250MB"}) as srv:
        for _ in range(3):
            chat(srv.url, "alpha")

        def sampled() -> list[dict[str, Any]] | None:
            s = httpx.get(srv.url + "/admin/history").json()["samples"]
            return [x for x in s if "alpha" in x["rates"]] or None

        hit = wait_for(sampled, 15, what="a sample with alpha's requests")
        assert sum(x["rates"]["alpha"]["rps"] for x in hit) > 0
        assert sum(x["rates"]["alpha"]["tps"] for x in hit) > 0
        doc = httpx.get(srv.url + "/admin/history").json()
        assert doc["interval"] == 2.0 and doc["window"] == 900.0
        last = doc["samples"][-1]
        assert last["budget"] == 250 * 10**6 and last["memory"] == {"alpha": 100_000_000}
        assert last["used"] == 100_000_000 and last["queued"] == {}
        with httpx.stream("GET", srv.url + "/admin/events", timeout=10) as r:  # live, same shape
            for line in r.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["kind"] == "sample":
                    live = json.loads(line[5:])
                    break
        assert live["memory"] == {"alpha": 100_000_000} and live["id"] > 0


def drawn_shares(page: Any, shot_path: Path) -> dict[str, float]:
    """The share of each chart's canvas drawn in the first series' color, from a screenshot."""
    page.screenshot(path=str(shot_path), full_page=True)
    shot = Image.open(shot_path)
    shares = {}
    for chart in ("#chart-tps canvas", "#chart-mem canvas"):
        box = page.locator(chart).bounding_box()
        shares[chart] = color_share(shot, box, BLUE) if box else 0.0
    return shares


def test_charts_pull_form_and_playground_in_headless_chromium(hub_root: Path, demo_model_dir: Path,
                                                              tmp_path: Path) -> None:
    size = (hub_root / "test-org" / "tiny-llama" / "model.safetensors").stat().st_size
    models = {"alpha": fake(), "llama": {"path": str(demo_model_dir)}}
    with HubProcess(hub_root, rate=size / 4) as hub, \
            ServerProcess(models, {"memory_budget": "2GB"}, env=hub.env(tmp_path / "cache")) as srv, \
            status_page(srv.url) as page:
        page.wait_for_selector("#conn.on")

        # Charts: traffic shows up as alpha's series with non-zero rates, drawn in its color.
        for _ in range(4):
            chat(srv.url, "alpha")
        page.wait_for_function("document.querySelector('#chart-tps').dataset.series === 'alpha'",
                               timeout=20_000)
        page.wait_for_function("charts.tps.plot.data[1].some((v) => v > 0)", timeout=20_000)
        assert page.evaluate("charts.rps.plot.data[1].some((v) => v > 0)")
        assert page.evaluate("charts.mem.plot.data[1].some((v) => v === 100000000)")
        assert page.evaluate("charts.mem.plot.data[2].every((v) => v === 2000000000)")  # budget
        # A burst that lands in one sample is a one-pixel spike: keep traffic flowing until the
        # drawn line is long enough to count, or 20 s pass.
        deadline = time.monotonic() + 20
        while True:
            shares = drawn_shares(page, tmp_path / "charts.png")
            if min(shares.values()) > 0.002 or time.monotonic() > deadline:
                break
            chat(srv.url, "alpha")
            time.sleep(0.5)
        assert min(shares.values()) > 0.002, shares

        # The pull form: a live progress bar, then the model is in the catalog.
        page.fill("#pullrepo", "test-org/tiny-llama")
        page.click("#pullform button")
        page.wait_for_function("(() => { const p = document.querySelector('.pullrow progress');"
                               " return p && p.value > 0 && p.value < p.max; })()", timeout=30_000)
        assert "of" in page.inner_text(".pullrow .line .muted")
        page.wait_for_selector(".pullrow.done", timeout=60_000)
        assert "served as tiny-llama" in page.inner_text(".pullrow")
        page.wait_for_selector('#catalog tbody tr[data-model="tiny-llama"]')
        assert page.locator('.pullrow[data-repo="test-org/tiny-llama"]').count() == 1

        # A pull started elsewhere (the CLI, another client) shows up on the page too.
        elsewhere = threading.Thread(target=lambda: httpx.post(
            srv.url + "/admin/models/pull", json={"repo": "test-org/other-llama"}, timeout=120).read())
        elsewhere.start()
        other = '.pullrow[data-repo="test-org/other-llama"]'
        page.wait_for_function(f"(() => {{ const p = document.querySelector('{other} progress');"
                               " return p && p.value > 0 && p.value < p.max; })()", timeout=30_000)
        page.wait_for_selector(other + ".done", timeout=60_000)
        elsewhere.join(60)
        assert "served as other-llama" in page.inner_text(other)
        kinds = page.eval_on_selector_all("#events li", "els => els.map((e) => e.dataset.kind)")
        assert kinds and not {"sample", "pull"} & set(kinds)  # the events list keeps to lifecycle

        # The playground: a cold model loads on demand (shown), the answer streams in.
        page.evaluate("""() => {
            window.seen = {status: [], lengths: []};
            new MutationObserver(() => seen.status.push(playstatus.textContent))
                .observe(playstatus, {childList: true, characterData: true, subtree: true});
            new MutationObserver(() => seen.lengths.push(playout.textContent.length))
                .observe(playout, {childList: true, characterData: true, subtree: true});
        }""")
        page.select_option("#playmodel", "llama")
        page.fill("#playmsg", "Hello there")
        page.click("#playsend")
        page.wait_for_selector('#playout[data-done="1"]', timeout=60_000)
        seen = page.evaluate("seen")
        assert any("loading" in s or "starting" in s for s in seen["status"]), seen["status"]
        # It grew piece by piece (the gateway batches SSE writes, so how many pieces varies).
        assert len(set(seen["lengths"])) >= 2 and any("streaming" in s for s in seen["status"])
        final = page.inner_text("#playstatus")
        assert "TTFT" in final and "tokens/s" in final and "200 tokens" in final, final
        assert page.inner_text("#playout").strip()
        page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
        print(f"screenshot: {tmp_path / 'status-page.png'}")  # docs/status-page.png is one
        assert hub.gets("test-org/tiny-llama", "model.safetensors")
