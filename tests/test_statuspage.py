"""The status page: the event hub (ring, backlog, bounded subscribers), the public page and its
key-guarded JSON/SSE routes on a real gateway, and the page itself in real headless Chromium."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from playwright.sync_api import Page

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.observe.statuspage import EventHub, StatusPage
from mlx_supervisor.gateway.testing.browser import color_share, status_page
from mlx_supervisor.gateway.testing.server import ServerProcess
from mlx_supervisor.shared.config import Config

ADMIN = "adm-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
SETTINGS: dict[str, Any] = {"memory_budget": "250MB", "warm_spare": False, "admin_key": ADMIN}


def fake() -> dict[str, Any]:
    return {"path": "/nonexistent/fake", "kind": "fake", "env": {"FAKE_MEMORY_BYTES": "100000000"}}


def chat(srv: ServerProcess, model: str) -> None:
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text


def sse_events(resp: httpx.Response) -> Iterator[dict[str, Any]]:
    """The lifecycle events (the charts' samples share the stream: test_statuspage_charts.py)."""
    for line in resp.iter_lines():
        if line.startswith("data:"):
            ev = json.loads(line[5:])
            if ev["kind"] != "sample":
                yield ev


def read_until(events: Iterator[dict[str, Any]], kind: str, model: str) -> list[dict[str, Any]]:
    seen = []
    for ev in events:
        seen.append(ev)
        if ev["kind"] == kind and ev.get("model") == model:
            return seen
    raise AssertionError(f"stream ended before {kind} {model}: {seen}")


# ---------------------------------------------------------------- the hub, in process


async def test_ring_backlog_resume_and_a_slow_subscriber_is_cut_off(tmp_path: Path) -> None:
    hub = EventHub(size=5, queue_size=3)
    for i in range(8):
        hub.publish("ready", model=f"m{i}", pid=None)
    assert [e["id"] for e in hub.ring] == [4, 5, 6, 7, 8] and "pid" not in hub.ring[0]
    _, backlog = hub.subscribe(after=6)  # a reconnect with Last-Event-ID: 6
    assert [e["id"] for e in backlog] == [7, 8]

    gw = Gateway.build(Config(), {}, {}, 10**9, f"ipc://{tmp_path}/gw.sock")
    try:
        page = StatusPage(gw, hub)
        sub, backlog = hub.subscribe()
        stream = page._stream(sub, backlog)
        first = await stream.__anext__()
        assert first.startswith(b"retry: ") and first.count(b"\nid: ") == 5  # the whole ring
        for i in range(5):  # the browser reads nothing: its queue (3) overflows
            hub.publish("evicted", model=f"x{i}")
        assert sub.dropped and sub not in hub.subscribers and sub.queue.qsize() == 3
        rest = [chunk async for chunk in stream]  # what was queued, then the stream ends
        assert [c.split(b"\n")[0] for c in rest] == [b"id: 9", b"id: 10", b"id: 11"]
        assert not hub.subscribers  # the idle one from the resume check overflowed too
    finally:
        await gw.sup.transport.close()


# ---------------------------------------------------------------- routes on a real gateway


def test_page_is_public_admin_routes_need_the_key_and_events_stream_with_backlog() -> None:
    with ServerProcess({"a": fake()}, SETTINGS) as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in page.text
        for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
            r = httpx.get(srv.url + "/static/" + name)
            assert r.status_code == 200 and ctype in r.headers["content-type"]
        for path in ("/admin/status", "/admin/events"):
            assert httpx.get(srv.url + path).status_code == 401

        assert httpx.post(srv.url + "/admin/models/a/load", headers=AUTH, timeout=30).status_code == 200
        assert httpx.post(srv.url + "/admin/models/a/unload", headers=AUTH, timeout=30).status_code == 200
        st = httpx.get(srv.url + "/admin/status", headers=AUTH).json()
        assert st["workers"] == [] and st["budget_bytes"] == 250 * 10**6
        assert [(m["id"], m["state"], m["loads"]) for m in st["models"]] == [("a", "cold", 1)]

        with httpx.stream("GET", srv.url + "/admin/events", headers=AUTH, timeout=10) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp)
            backlog = read_until(events, "stopped", "a")
            assert [e["kind"] for e in backlog] == ["spawning", "loading", "ready", "draining", "stopped"]
            assert backlog[3]["reason"] == "unloaded by admin" and backlog[2]["pid"] > 0
            assert st["last_event_id"] == backlog[-1]["id"]
            # Live: a load started now arrives on the open stream.
            t = threading.Thread(target=chat, args=(srv, "a"))
            t.start()
            live = read_until(events, "ready", "a")
            t.join()
            assert [e["kind"] for e in live] == ["spawning", "loading", "ready"]
        # A reconnect with Last-Event-ID gets only what it missed.
        ready_id = backlog[2]["id"]
        with httpx.stream("GET", srv.url + "/admin/events", timeout=10,
                          headers={**AUTH, "Last-Event-ID": str(ready_id)}) as resp:
            resumed = read_until(sse_events(resp), "ready", "a")
        assert [e["id"] for e in resumed] == [e["id"] for e in backlog[3:] + live]

        # A browser left open does not hold up shutdown: its stream ends when the gateway stops.
        ended = threading.Event()

        def watch() -> None:
            with httpx.stream("GET", srv.url + "/admin/events", headers=AUTH, timeout=30) as r:
                for _ in r.iter_lines():
                    pass
            ended.set()

        threading.Thread(target=watch, daemon=True).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert srv.stop() == 0
        assert ended.wait(5) and time.monotonic() - t0 < 4


# ---------------------------------------------------------------- the page in Chromium


def hot_row(page: Page, model: str) -> Any:
    return page.locator(f'#workers tbody tr[data-model="{model}"]')


def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    green = (0x2E, 0x9D, 0x5B)  # --ready in style.css
    with ServerProcess({"alpha": fake(), "beta": fake()}, SETTINGS) as srv, status_page(srv.url) as page:
        page.wait_for_selector("#banner:not([hidden])")
        assert "admin key" in page.inner_text("#banner")
        page.fill("#key", ADMIN)
        page.click("#keyform button")
        page.wait_for_selector('#catalog tbody tr[data-model="beta"]')
        page.wait_for_selector("#conn.on")
        assert page.is_visible("#noworkers") and page.is_hidden("#banner")
        assert page.evaluate("localStorage.getItem('mlx-supervisor.adminKey')") == ADMIN

        chat(srv, "alpha")  # appears after a request...
        hot_row(page, "alpha").wait_for()
        # The page polls once a second: it may first have shown the row while loading.
        page.wait_for_selector('#workers tbody tr[data-model="alpha"][data-state="ready"]')
        pid = httpx.get(srv.url + "/admin/ps", headers=AUTH).json()["workers"][0]["pid"]
        assert str(pid) in hot_row(page, "alpha").inner_text()
        page.wait_for_selector('#events li[data-kind="ready"]')
        httpx.post(srv.url + "/admin/models/alpha/unload", headers=AUTH, timeout=30)
        hot_row(page, "alpha").wait_for(state="detached")  # ...and goes after an unload

        chat(srv, "beta")
        # Settled: ready and idle (a row is re-rendered only when what it shows changes).
        page.wait_for_selector('#workers tbody tr[data-model="beta"][data-state="ready"]')
        page.wait_for_function("document.querySelector('#workers tbody tr .inflight')"
                               "?.textContent === '0'")
        page.wait_for_selector('#membar span[data-model="beta"]')
        row = hot_row(page, "beta")

        def layout() -> list[dict[str, float] | None]:
            return [row.locator(".state").bounding_box(), row.locator(".bar").bounding_box(),
                    row.locator(".bar > i").bounding_box(),
                    page.locator('#membar span[data-model="beta"]').bounding_box()]

        before = layout()
        shot_path = tmp_path / "status-hot.png"
        page.screenshot(path=str(shot_path), full_page=True)
        badge, bar, fill, overall = layout()
        assert before == [badge, bar, fill, overall]  # nothing moved around the screenshot
        assert badge and bar and fill and overall
        shot = Image.open(shot_path)
        assert shot.size[0] == 1280
        # The pixels show what the DOM claims: a green ready badge, a green memory bar at
        # 40% of the budget (100 MB of 250 MB), and the page-wide memory bar.
        assert color_share(shot, badge, green) > 0.4
        assert color_share(shot, fill, green) > 0.9
        assert abs(fill["width"] / bar["width"] - 0.4) < 0.02
        assert color_share(shot, overall, green) > 0.6
        assert "PINNED" not in hot_row(page, "beta").inner_text()

        page.click('#catalog tbody tr[data-model="beta"] button[data-action="unload"]')
        hot_row(page, "beta").wait_for(state="detached")
        page.wait_for_selector("#noworkers:not([hidden])")
        deadline = time.monotonic() + 15
        while httpx.get(srv.url + "/admin/ps", headers=AUTH).json()["workers"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/admin/ps", headers=AUTH).json()["workers"] == []
        page.wait_for_selector('#events li[data-kind="stopped"]')
        assert "unloaded by admin" in page.inner_text("#events")
        page.screenshot(path=str(tmp_path / "status-after-unload.png"), full_page=True)
