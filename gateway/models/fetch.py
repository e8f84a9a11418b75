"""One weights file into the standard Hugging Face cache, resumable across interruptions.

``hf_hub_download`` retries a dropped connection a few times within one call, but it deletes
its partial file when the call fails (huggingface_hub 1.x+ writes to a per-process temp name),
so a pull interrupted for longer (the Hub down, the gateway restarted, a cancel) would start
from zero. So the weights take this path instead, built from the same client's parts:

1. ``get_hf_file_metadata``: the blob's etag, size and download URL (``HF_TOKEN`` applies);
2. under the cache's own lock for that blob, ``http_get`` appends to ``blobs/ETAG.incomplete``
   from the byte it already holds (a ``Range`` request), then the file is checked against the
   LFS sha256 (when resumed) and renamed to ``blobs/ETAG``;
3. ``hf_hub_download`` then finds the blob and only links it into the snapshot.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from mlx_supervisor.gateway.catalog import hf_cache_dir

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _blob(repo: str, etag: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hf_cache_dir() / repo_folder_name(repo_id=repo, repo_type="model") / "blobs" / etag


def fetch(repo: str, filename: str, revision: str, tqdm_class: Any) -> str:
    """Download ``filename`` at ``revision`` into the cache; its snapshot path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision))
    if meta.etag is None:
        raise OSError(f"the Hub gave no etag for {repo}/{filename}")
    blob = _blob(repo, meta.etag)
    lock = hf_cache_dir() / ".locks" / blob.parent.parent.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    blob.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(str(lock)):
        if not blob.exists():
            part = blob.with_name(meta.etag + ".incomplete")
            have = part.stat().st_size if part.exists() else 0
            if meta.size is not None and have > meta.size:
                part.unlink()
                have = 0
            with open(part, "ab") as out:
                http_get(meta.location, out, resume_size=have, headers=build_hf_headers(),
                         expected_size=meta.size, displayed_filename=filename, tqdm_class=tqdm_class)
            if have and _SHA256.match(meta.etag) and _sha256(part) != meta.etag:
                part.unlink()  # a resumed file that does not add up: never let it be served
                raise OSError(f"{filename}: the resumed download does not match its sha256; "
                              "pull again to fetch it whole")
            os.replace(part, blob)
    path: str = hf_hub_download(repo, filename, revision=revision)  # links the blob, moves nothing
    return path
