"""Logging: one line per event, text or JSON, with the request id of the task that logged it.

A daemon (``serve --log-file``) writes its own size-rotated file instead of a shell redirect, so
the log cannot fill the disk and rotation never leaves us writing to a renamed file.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from mlx_supervisor.shared.config import Config


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            from mlx_supervisor.gateway.api.gateway import request_id_var

            record.request_id = request_id_var.get()
        return True


class JSONFormatter(logging.Formatter):
    _SKIP = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in self._SKIP and v is not None:
                out[k] = v if isinstance(v, (str, int, float, bool)) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(out).decode()


LOG_MAX_BYTES = 10 * 2**20
LOG_BACKUPS = 5


def setup_logging(cfg: Config, stream: Any = None, log_file: str | Path | None = None,
                  max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> logging.Handler:
    handler: logging.Handler
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes,
                                                       backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(_RequestId())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(cfg.log_level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpx2"):  # httpx*: one line per Hub request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
