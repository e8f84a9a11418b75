"""Images in chat messages: ``data:`` URLs, ``file://`` paths inside allow-listed directories, and
(opt-in) remote ``http(s)`` URLs fetched with a size cap and a timeout.

The gateway resolves every image to bytes before a worker sees the request, so a worker never
opens a path or a socket on a user's behalf, and a bad image is a 400 before any model loads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlx_supervisor.gateway.api.gateway import Gateway
from mlx_supervisor.gateway.errors import APIError
from mlx_supervisor.shared.config import VisionConfig

MAX_IMAGES = 16
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF")


def _bad(msg: str) -> APIError:
    return APIError(400, msg, param="messages", code="invalid_image")


def _check(data: bytes, cfg: VisionConfig, what: str) -> bytes:
    if len(data) > cfg.max_image_bytes:
        raise _bad(f"{what} is {len(data)} bytes, over max_image_bytes ({cfg.max_image_bytes})")
    if not data.startswith(_MAGIC):
        raise _bad(f"{what} is not a PNG, JPEG, GIF or WebP image")
    return data


def _from_data_url(url: str, cfg: VisionConfig) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise _bad("image data URLs must look like data:image/<type>;base64,<data>")
    if len(payload) > cfg.max_image_bytes * 4 // 3 + 4:
        raise _bad(f"image is over max_image_bytes ({cfg.max_image_bytes})")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image data URL is not valid base64") from None
    return _check(data, cfg, "image")


def _from_file(url: str, cfg: VisionConfig) -> bytes:
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path)
    if "\x00" in raw:
        raise _bad("file:// image paths must not contain NUL")
    path = Path(raw).resolve()
    allowed = [Path(d).expanduser().resolve() for d in cfg.image_dirs]
    if not any(path.is_relative_to(d) for d in allowed):
        raise _bad("file:// images must be inside one of the configured vision.image_dirs"
                   + ("" if allowed else " (none are configured)"))
    try:
        with open(path, "rb") as f:
            data = f.read(cfg.max_image_bytes + 1)
    except OSError:
        raise _bad(f"cannot read image {path.name!r}") from None
    return _check(data, cfg, f"image {path.name!r}")


def _fetch(url: str, cfg: VisionConfig) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "mlx-supervisor"})
    try:
        with urllib.request.urlopen(req, timeout=cfg.fetch_timeout) as resp:  # noqa: S310 - scheme checked
            data: bytes = resp.read(cfg.max_image_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise _bad(f"could not fetch image {url[:200]!r}: {getattr(e, 'reason', e)}") from None
    return _check(data, cfg, f"image {url[:200]!r}")


async def resolve(urls: list[str], cfg: VisionConfig) -> list[bytes]:
    if len(urls) > MAX_IMAGES:
        raise _bad(f"at most {MAX_IMAGES} images per request, got {len(urls)}")
    out: list[bytes] = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            out.append(_from_data_url(url, cfg))
        elif scheme == "file":
            out.append(await asyncio.to_thread(_from_file, url, cfg))
        elif scheme in ("http", "https"):
            if not cfg.allow_remote_images:
                raise _bad("remote images are disabled (set vision.allow_remote_images = true)")
            out.append(await asyncio.to_thread(_fetch, url, cfg))
        else:
            raise _bad(f"unsupported image URL scheme {scheme[:20]!r}")
    return out


def attach(gw: Gateway) -> None:
    async def fetch(urls: list[str]) -> list[bytes]:
        return await resolve(urls, gw.cfg.vision)

    gw.image_fetcher = fetch
