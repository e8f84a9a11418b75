"""``logs [-f] [--worker MODEL]``: the gateway's log file, optionally one model's lines, followed
across size rotation (a rotation renames the file: we notice the new inode and reopen)."""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def model_filter(model: str | None) -> re.Pattern[str] | None:
    """Lines about ``model``: its worker's stderr (``[MODEL pid=N]``) and ``model=MODEL`` events."""
    if not model:
        return None
    m = re.escape(model)
    return re.compile(rf"\[{m} pid=|\bmodel={m}(?:[\s,;]|$)")


def last_lines(path: Path, n: int, pattern: re.Pattern[str] | None) -> list[str]:
    out: deque[str] = deque(maxlen=max(n, 0))
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if pattern is None or pattern.search(line):
                out.append(line.rstrip("\n"))
    return list(out)


def follow(path: Path, pattern: re.Pattern[str] | None, poll: float = 0.2) -> Iterator[str]:
    """New lines as they are written, from the current end; survives rotation and truncation."""
    f: TextIO = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - reopened on rotation
    f.seek(0, os.SEEK_END)
    ino = os.fstat(f.fileno()).st_ino
    partial = ""
    try:
        while True:
            chunk = f.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    line, partial = partial.rstrip("\n"), ""
                    if pattern is None or pattern.search(line):
                        yield line
                continue
            time.sleep(poll)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # between the rename and the new file
            if st.st_ino != ino or st.st_size < f.tell():
                f.close()
                f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
                ino = os.fstat(f.fileno()).st_ino
    finally:
        f.close()


def run(path: Path, lines: int, follow_: bool, model: str | None) -> int:
    if not path.exists():
        print(f"mlx-supervisor: no log at {path} (a gateway started with `mlx-supervisor start` or as a "
              "service writes one; a foreground `serve` logs to its terminal)", file=sys.stderr)
        return 1
    pattern = model_filter(model)
    for line in last_lines(path, lines, pattern):
        print(line)
    if not follow_:
        return 0
    sys.stdout.flush()
    try:
        for line in follow(path, pattern):
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    return 0
