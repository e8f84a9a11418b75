"""The config schema: one TOML file decoded by msgspec into Structs.

Unknown keys and wrong types are errors that name the key path (``$.models.llama.ttl``), so a
typo never silently falls back to a default. ``check()`` adds the semantic checks msgspec cannot
express (paths exist, sizes parse, aliases unique) and returns every problem at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mlx_supervisor.shared.sizes import parse_size

Kind = Literal["lm", "vlm", "embeddings", "fake"]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(Strict):
    path: str | None = None
    """A local model directory (config.json + weights)."""
    repo: str | None = None
    """A Hugging Face repo id resolved in the local HF cache (never downloaded unless allowed)."""
    revision: str | None = None
    """With ``repo``: the commit to serve (``pull`` records the one it fetched); else the newest."""
    kind: Kind | None = None
    """lm, vlm or embeddings; detected from config.json when absent. ``fake`` is the test worker."""
    pinned: bool = False
    ttl: float | None = None
    """Seconds idle before unload; None = the server default; 0 = never."""
    aliases: list[str] = []
    max_concurrency: int | None = None
    max_queue: int | None = None
    memory: str | None = None
    """Override the on-disk estimate, e.g. "6GB"."""
    context_length: int | None = None
    env: dict[str, str] = {}
    """Extra environment for this model's worker process."""
    tool_choice: Literal["auto", "required", "none"] = "auto"
    """The ``tool_choice`` of a request that gives ``tools`` but no ``tool_choice`` (OpenAI's
    default is ``auto``). ``required`` forces a call for clients that cannot ask for one (llm
    sends ``tools`` only); a request's own ``tool_choice`` always wins."""
    # Sharded models (mlx.distributed): one logical worker spread over ranks.
    hosts: list[str] = []
    backend: Literal["ring", "jaccl", "mpi"] = "ring"
    parallel: Literal["tensor", "pipeline"] = "tensor"
    formation_timeout: float = 30.0
    """Seconds a sharded group gets to connect all its ranks before the load fails."""


class LedgerConfig(Strict):
    enabled: bool = True
    path: str | None = None
    retention_days: float = 7.0
    max_rows: int = 1_000_000
    store_bodies: bool = False
    response_retention_days: float = 30.0
    """Days a stored OpenAI Responses answer (``store: true``) is kept for retrieval and
    ``previous_response_id``."""


class VisionConfig(Strict):
    allow_remote_images: bool = False
    image_dirs: list[str] = []
    """Directories that ``file://`` image URLs may point into."""
    max_image_bytes: int = 20 * 2**20
    fetch_timeout: float = 10.0


class Config(Strict):
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    admin_key: str | None = None
    memory_budget: str = "75%"
    max_models: int = 0
    """Cap on hot workers; 0 = no cap beyond memory."""
    default_ttl: float = 0.0
    max_concurrency: int = 8
    max_queue: int = 64
    queue_timeout: float = 60.0
    max_body_bytes: int = 16 * 2**20
    cors_origins: list[str] = []
    """Browser origins allowed to call the API (CORS); empty = no CORS headers at all."""
    # Connection limits (gateway/connections.py): clocks per phase, sizes, and the cap.
    header_timeout: float = 10.0
    """Seconds a connection gets to send a request's line and headers (then it is closed)."""
    body_timeout: float = 60.0
    """Seconds from the end of the headers to the end of the body (then 408)."""
    write_timeout: float = 30.0
    """Seconds a client may leave its socket full (not reading) before it is cut off and its
    request cancelled."""
    keep_alive_timeout: float = 30.0
    """Seconds an idle kept-alive connection stays open between requests."""
    max_header_bytes: int = 32 * 1024
    """Request line plus headers; more is answered 431."""
    max_connections: int = 1000
    """Open client connections; past it the oldest idle one is closed, or the new one gets 503.
    Lowered at start to fit the open-files limit."""
    stream_buffer: int = 64
    """Messages a stream may fall behind its client before its request is paused in the worker."""
    public_metrics: bool = False
    """With an api_key set, /metrics needs a key unless this is true."""
    load_timeout: float = 300.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    shutdown_grace: float = 30.0
    stop_grace: float = 5.0
    """Seconds a worker gets to exit after a Shutdown message before SIGTERM (then SIGKILL)."""
    headroom: float = 0.2
    turn_seconds: float = 10.0
    """When the memory a cold model needs is held by busy models, a holder yields it (drained
    between requests) once it has had it this long; waiting models take turns."""
    max_crashes: int = 3
    crash_window: float = 60.0
    warm_spare: bool = True
    warm_spares: int = 1
    """How many warm spares to keep (when ``warm_spare``): where workers cannot be forked (CUDA,
    macOS) each covers one more miss in a row without an import."""
    fork_server: bool = True
    """Linux: fork workers from a zygote that has imported the MLX stack (ignored on macOS)."""
    learned_headroom: float = 0.25
    recycle_workers: int = 8
    """An idle worker evicted to admit another model unloads its model and loads the new one in
    the same process (no spawn, no import), at most this many times per process; 0: never."""
    """Growth allowed on a model's measured footprint when it replaces the estimate; 0: off."""
    discover_hf_cache: bool = False
    allow_download: bool = False
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    run_dir: str | None = None
    log_dir: str | None = None
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    vision: VisionConfig = msgspec.field(default_factory=VisionConfig)
    models: dict[str, ModelConfig] = {}


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists every ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  {k}: {m}" for k, m in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


def _split_msgspec_error(err: Exception) -> tuple[str, str]:
    text = str(err)
    if " - at `" in text:
        msg, _, path = text.rpartition(" - at `")
        return path.rstrip("`"), msg
    return "$", text


def loads(text: str, source: str = "config") -> Config:
    """Parse and type-check TOML text (no semantic checks)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("$", f"invalid TOML: {e}")], source) from None
    # Models are converted one by one so an error names the model, not ``$.models[...]``.
    raw_models = raw.pop("models", {})
    problems: list[tuple[str, str]] = []
    models: dict[str, ModelConfig] = {}
    if not isinstance(raw_models, dict):
        problems.append(("$.models", "must be a table of [models.NAME] entries"))
        raw_models = {}
    for name, body in raw_models.items():
        try:
            models[name] = msgspec.convert(body, ModelConfig)
        except msgspec.ValidationError as e:
            path, msg = _split_msgspec_error(e)
            problems.append((f"$.models.{name}{path[1:]}", msg))
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        problems.insert(0, _split_msgspec_error(e))
    if problems:
        raise ConfigError(problems, source)
    cfg.models = models
    return cfg


def load(path: str | Path) -> Config:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("$", f"cannot read {p}: {e.strerror}")], str(p)) from None
    cfg = loads(text, str(p))
    # Relative model paths are relative to the config file, not the cwd of whoever started us.
    for m in cfg.models.values():
        if m.path and not Path(m.path).expanduser().is_absolute():
            m.path = str((p.parent / m.path).resolve())
    add_dropins(cfg, p.parent)
    return cfg


def add_dropins(cfg: Config, config_dir: Path) -> None:
    """Merge the machine-written ``models.d/NAME.toml`` entries (see shared/dropins.py) into
    ``cfg.models``; a bad file or a name the main config already uses is a ConfigError."""
    from mlx_supervisor.shared import dropins

    found = dropins.read_all(config_dir)
    clash = [(str(dropins.file_of(config_dir, n)), f"model {n!r} is already defined in the main config")
             for n in found if n in cfg.models]
    if clash:
        raise ConfigError(clash, str(dropins.directory(config_dir)))
    cfg.models.update(found)


def semantic_problems(cfg: Config, total_memory: int) -> list[tuple[str, str]]:
    """Every problem a well-typed config can still have."""
    out: list[tuple[str, str]] = []
    try:
        budget = parse_size(cfg.memory_budget, total_memory)
    except ValueError as e:
        out.append(("$.memory_budget", str(e)))
        budget = None
    for key in ("max_concurrency", "max_queue", "max_body_bytes", "port", "max_header_bytes",
                "max_connections", "stream_buffer"):
        if getattr(cfg, key) < (0 if key == "max_queue" else 1):
            out.append((f"$.{key}", f"must be positive, got {getattr(cfg, key)}"))
    for key in ("header_timeout", "body_timeout", "write_timeout", "keep_alive_timeout", "turn_seconds"):
        if getattr(cfg, key) <= 0:
            out.append((f"$.{key}", f"must be positive (seconds), got {getattr(cfg, key)}"))
    if cfg.heartbeat_timeout <= cfg.heartbeat_interval:
        out.append(("$.heartbeat_timeout", "must be larger than heartbeat_interval"))
    for key in ("warm_spares", "learned_headroom", "recycle_workers"):
        if getattr(cfg, key) < 0:
            out.append((f"$.{key}", f"must not be negative, got {getattr(cfg, key)}"))
    names: dict[str, str] = {}
    for name, m in cfg.models.items():
        at = f"$.models.{name}"
        if not name or "/" in name and m.repo is None and m.path is None:
            out.append((at, "bad model name"))
        if (m.path is None) == (m.repo is None):
            out.append((at, "needs exactly one of `path` or `repo`"))
        elif m.revision is not None and m.repo is None:
            out.append((f"{at}.revision", "only a `repo` model has a revision"))
        elif m.path and m.kind != "fake" and not Path(m.path).expanduser().is_dir():
            out.append((f"{at}.path", f"not a directory: {m.path}"))
        if m.ttl is not None and m.ttl < 0:
            out.append((f"{at}.ttl", "must be >= 0 (0 = never unload)"))
        if m.memory is not None:
            try:
                need = parse_size(m.memory)
                if budget is not None and need > budget:
                    out.append((f"{at}.memory", f"{m.memory} is larger than the whole memory budget"))
            except ValueError as e:
                out.append((f"{at}.memory", str(e)))
        out += _sharding_problems(at, m)
        for alias in [name, *m.aliases]:
            if alias in names and names[alias] != name:
                out.append((f"{at}.aliases", f"{alias!r} is already used by model {names[alias]!r}"))
            names[alias] = name
    return out


def _sharding_problems(at: str, m: ModelConfig) -> list[tuple[str, str]]:
    """A sharded model (``hosts``) that cannot work: caught here, not at its first request."""
    from mlx_supervisor.shared.hosts import is_ip, is_local_host
    from mlx_supervisor.shared.sizes import read_model_config

    if not m.hosts:
        return []
    out: list[tuple[str, str]] = []
    n = len(m.hosts)
    if n < 2:
        out.append((f"{at}.hosts", "a sharded model needs at least 2 hosts (one per rank); "
                    "leave `hosts` out for an ordinary worker"))
    if m.kind not in (None, "lm"):
        out.append((f"{at}.kind", f"only text models (lm) can be sharded, not {m.kind!r}"))
    if not is_local_host(m.hosts[0]):
        out.append((f"{at}.hosts", f"hosts[0] ({m.hosts[0]}) must be this machine: rank 0 "
                    "talks to the gateway"))
    if m.backend == "ring":
        bad = [h for h in m.hosts if not is_ip(h)]
        if bad:
            out.append((f"{at}.hosts", f"the ring backend needs IP addresses, got {bad}"))
    if m.formation_timeout <= 0:
        out.append((f"{at}.formation_timeout", "must be positive"))
    cfg = read_model_config(m.path) if m.path else {}
    cfg = {**cfg, **(cfg.get("text_config") or {})}
    if n >= 2 and m.parallel == "tensor" and cfg:
        heads = int(cfg.get("num_attention_heads") or 0)
        kv = int(cfg.get("num_key_value_heads") or heads)
        for key, val in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if val and val % n:
                out.append((f"{at}.hosts", f"tensor parallelism over {n} ranks needs {key} "
                            f"divisible by {n}, but the model has {val}"))
    if n >= 2 and m.parallel == "pipeline" and cfg:
        layers = int(cfg.get("num_hidden_layers") or 0)
        if layers and layers < n:
            out.append((f"{at}.hosts", f"pipeline parallelism over {n} ranks needs at least "
                        f"{n} layers, but the model has {layers}"))
    return out
