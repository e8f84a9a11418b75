"""Catalog drop-ins: ``models.d/NAME.toml`` beside the config file, one model per file.

``pull`` and ``add`` write them, ``rm`` deletes them; the main config stays hand-written. A file
is the body of one ``[models.NAME]`` table, named by its stem. Writes go to a temp file in the
same directory, then ``os.replace``: a reader (a reload, a crash halfway) sees the old file or
the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIR = "models.d"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HEADER = "# Written by mlx-supervisor (pull / add); `mlx-supervisor rm {name}` removes it.\n"


def directory(config_dir: Path) -> Path:
    return Path(config_dir) / DIR


def file_of(config_dir: Path, name: str) -> Path:
    return directory(config_dir) / f"{name}.toml"


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a drop-in's name (it is a file name too), or None."""
    if NAME.match(name) and not name.endswith(".toml"):
        return None
    return (f"bad model name {name[:100]!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit), at most 128 characters")


def read_all(config_dir: Path) -> dict[str, Any]:
    """Every drop-in as ``{name: ModelConfig}``; a file that does not parse raises ConfigError
    naming it (with the key path inside it)."""
    from mlx_supervisor.shared.config import ConfigError, ModelConfig, _split_msgspec_error

    d = directory(config_dir)
    if not d.is_dir():
        return {}
    out: dict[str, ModelConfig] = {}
    problems: list[tuple[str, str]] = []
    for f in sorted(d.glob("*.toml")):
        bad = name_problem(f.stem)
        try:
            if bad:
                raise ValueError(bad)
            m = msgspec.convert(tomllib.loads(f.read_text(encoding="utf-8")), ModelConfig)
        except (OSError, ValueError) as e:  # TOMLDecodeError is a ValueError
            path, msg = _split_msgspec_error(e) if isinstance(e, msgspec.ValidationError) else ("$", str(e))
            problems.append((f"{f}: {path}", msg))
            continue
        if m.path and not Path(m.path).expanduser().is_absolute():
            m.path = str((Path(config_dir) / m.path).resolve())
        out[f.stem] = m
    if problems:
        raise ConfigError(problems, str(d))
    return out


def toml_value(v: Any) -> str:
    """``v`` as a TOML value (the config's writers: drop-ins here, the test server's config)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def render(name: str, model: Any) -> str:
    """The file's text: only the fields that differ from the defaults."""
    from mlx_supervisor.shared.config import ModelConfig

    defaults = msgspec.to_builtins(ModelConfig())
    body = {k: v for k, v in msgspec.to_builtins(model).items() if v != defaults.get(k)}
    return HEADER.format(name=name) + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())


def write(config_dir: Path, name: str, model: Any) -> Path:
    """Write (or replace) ``models.d/NAME.toml`` atomically; returns its path."""
    bad = name_problem(name)
    if bad:
        raise ValueError(bad)
    d = directory(config_dir)
    d.mkdir(parents=True, exist_ok=True)
    target = file_of(config_dir, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(name, model))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def remove(config_dir: Path, name: str) -> bool:
    """Delete ``models.d/NAME.toml``; False when there was none."""
    if name_problem(name):
        return False
    try:
        file_of(config_dir, name).unlink()
    except FileNotFoundError:
        return False
    return True
