"""Headless Chromium for the status-page tests: the system browser, its flags, and a pixel check
that a screenshot shows what the DOM claims."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from PIL import Image
from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no Chromium found: apt-get install -y chromium (see .ci/run)")


@contextlib.contextmanager
def status_page(url: str) -> Iterator[Page]:
    """The gateway's status page at ``url`` in headless Chromium, closed after; a JavaScript
    error on the page fails the test."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            yield page
            assert errors == []
        finally:
            browser.close()


def color_share(shot: Image.Image, box: dict[str, float], rgb: tuple[int, int, int]) -> float:
    """The fraction of pixels inside ``box`` (CSS px, device scale 1) close to ``rgb``."""
    crop = shot.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                      int(box["y"] + box["height"]))).convert("RGB")
    pixels = [crop.getpixel((x, y)) for x in range(crop.width) for y in range(crop.height)]
    near = sum(1 for p in pixels if all(abs(int(a) - b) < 24 for a, b in zip(p, rgb, strict=True)))  # type: ignore[arg-type, misc]
    return near / max(1, len(pixels))
