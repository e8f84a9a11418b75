"""The gateway <-> worker wire protocol.

Every message is a msgspec Struct in one tagged union, encoded as msgpack. The ROUTER in the
gateway sees ``[routing_id, payload]`` frames; a worker's DEALER sends bare ``payload`` frames.
A frame that does not decode raises ``msgspec.DecodeError`` (or ``ValidationError``) from
:func:`decode_from_worker` / :func:`decode_to_worker`; callers log and drop it, never crash on it.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 4  # 2: Pause and Resume (flow control); 3: tools, grammars, reasoning chunks;
# 4: Unload / Unloaded (an evicted worker is recycled, not killed)
"""Bumped with any change to a message a peer of another version would misread. A worker says
its version in ``Hello``; the gateway's transport refuses a mismatch as a load failure."""


class Base(msgspec.Struct, tag_field="t", omit_defaults=True, forbid_unknown_fields=False):
    """Common base: tagged by class name so the union decodes without a schema lookup."""


# ---------------------------------------------------------------- gateway -> worker


class JsonFormat(msgspec.Struct, omit_defaults=True):
    """Constrain the answer (after any thinking) to JSON: any object (``schema`` None, OpenAI's
    ``json_object``) or one valid against ``schema`` (``json_schema``). ``strict`` False compiles
    the schema leniently (keywords llguidance does not implement are ignored, not refused)."""

    schema: dict[str, Any] | None = None
    strict: bool = True


class ToolCall(msgspec.Struct, omit_defaults=True):
    """One parsed tool call, as OpenAI shows it: ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


class Generate(Base, tag="generate"):
    """One text (or vision) generation. Exactly one of ``messages``/``prompt``/``prompt_ids``."""

    id: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    images: list[bytes] = []
    """Raw image file bytes (PNG/JPEG), already fetched and size-checked by the gateway."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI function tools (``{"type": "function", "function": {...}}``), for the chat template
    and the model's tool parser; checked by the gateway (names, schemas that compile)."""
    tool_choice: str = "auto"
    """``auto``, ``none`` (tools are not shown to the model), ``required`` or ``function``
    (``tool_name``); the last two are enforced by a grammar."""
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    json_format: JsonFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra keyword arguments for the chat template (``enable_thinking``, ...)."""


class Load(Base, tag="load"):
    """Tell a warm spare (started with ``--spare``, imports done, no model) which model to load."""

    model_id: str
    path: str
    kind: str
    context_length: int = 0


class Embed(Base, tag="embed"):
    id: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None


class Cancel(Base, tag="cancel"):
    id: str


class Pause(Base, tag="pause"):
    """Flow control: the gateway's reader of this request is behind; stop sending it tokens
    (an engine that can pauses the sequence; otherwise the worker holds its output, merged)."""

    id: str


class Resume(Base, tag="resume"):
    id: str


class Unload(Base, tag="unload"):
    """Drop the model (engine, weights, caches) and wait for the next ``Load``: the gateway
    recycles an idle evicted worker instead of paying a new process. Answered by ``Unloaded``."""

    reason: str = ""


class Shutdown(Base, tag="shutdown"):
    reason: str = ""


class Ping(Base, tag="ping"):
    """Gateway liveness for the worker: a worker that hears nothing for a while exits."""


# ---------------------------------------------------------------- worker -> gateway


class Memory(msgspec.Struct, omit_defaults=True):
    active: int = 0
    cache: int = 0
    peak: int = 0
    rss: int = 0

    @property
    def footprint(self) -> int:
        """What the ledger charges: MLX buffers (active + cache) or RSS, whichever is larger."""
        return max(self.active + self.cache, self.rss)


class RankInfo(msgspec.Struct, omit_defaults=True):
    """One rank of a sharded worker group (``mlx.distributed``): where it runs and what it holds.
    ``bytes`` is measured for ranks on the gateway's machine (``local``) and 0 elsewhere."""

    rank: int
    host: str
    pid: int
    bytes: int = 0
    local: bool = True


class Hello(Base, tag="hello"):
    """First message after connect: the worker is alive and loading."""

    pid: int
    protocol: int = 0
    """The sender's ``PROTOCOL_VERSION``; 0 is a worker from before versions were sent."""


class Ready(Base, tag="ready"):
    pid: int
    kind: str
    load_seconds: float
    memory: Memory
    context_length: int = 0
    embedding_dims: int = 0
    ranks: list[RankInfo] = []
    """Sharded groups only: every rank; ``memory.rss`` is then the sum over the local ranks."""


class Unloaded(Base, tag="unloaded"):
    """The model is gone (collected, MLX's cache cleared); ``memory`` is measured after that,
    so the gateway can charge the process what it still holds."""

    memory: Memory
    unload_seconds: float = 0.0


class LoadFailed(Base, tag="load_failed"):
    reason: str


class TokenLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    top: list[tuple[str, float]] = []


class Chunk(Base, tag="chunk"):
    """Output since the last chunk; ``tokens`` counts the tokens behind it. ``text`` is the
    answer, ``reasoning`` the thinking (between the tokenizer's thinking markers) and
    ``tool_calls`` the calls parsed from the model's tool-call markup, none of which is text."""

    id: str
    text: str
    tokens: int = 1
    logprobs: list[TokenLogprob] | None = None
    reasoning: str = ""
    tool_calls: list[ToolCall] = []


class Started(Base, tag="started"):
    """The request left the worker's queue and is being prefilled."""

    id: str
    prompt_tokens: int = 0


class Done(Base, tag="done"):
    id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None
    """The stop string that ended the text (finish_reason "stop"); None for EOS."""


class Embeddings(Base, tag="embeddings"):
    """Float32 little-endian vectors, one ``bytes`` per input."""

    id: str
    vectors: list[bytes]
    dims: int
    prompt_tokens: int


class Error(Base, tag="error"):
    """A request failed. ``status`` is the HTTP status the gateway should answer with."""

    id: str
    message: str
    status: int = 500
    code: str = "worker_error"
    param: str | None = None


class Heartbeat(Base, tag="heartbeat"):
    memory: Memory
    inflight: int = 0
    queued: int = 0
    ranks: list[RankInfo] = []
    """Sharded groups only, as in ``Ready``."""


ToWorker = Load | Generate | Embed | Cancel | Pause | Resume | Unload | Shutdown | Ping
FromWorker = (
    Hello | Ready | Unloaded | LoadFailed | Started | Chunk | Done | Embeddings | Error | Heartbeat
)

_encoder = msgspec.msgpack.Encoder()
_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)


def encode(msg: Base) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)


# A worker's second DEALER, owned by its MLX thread, carries the per-request replies (Started,
# Chunk, Done, Embeddings, Error) straight to the gateway under ``worker_id + DATA_SUFFIX``: no hop
# through the io thread (and no GIL hand-off) per token. NUL cannot occur in a model id.
DATA_SUFFIX = b"\x00data"

# Exit codes a worker reserves so the gateway can tell why it ended (as gunicorn does at boot).
EXIT_LOAD_FAILED = 3
EXIT_PARENT_GONE = 4


# ---------------------------------------------------------------- gateway <-> zygote (fork server)
# One SOCK_SEQPACKET socketpair per zygote (one message per packet); ``Fork`` carries one file
# descriptor (the child's stderr pipe) as ancillary data. See worker/zygote.py.


class Fork(Base, tag="fork"):
    """Fork one worker: ``argv`` as for ``python -m mlx_supervisor.worker``, ``env`` its whole
    environment."""

    worker_id: str
    argv: list[str]
    env: dict[str, str]


class ZygoteHello(Base, tag="zygote_hello"):
    """Imports done, ready to fork; ``threads`` is the OS thread count at that point."""

    pid: int
    import_seconds: float
    threads: int
    rss: int = 0
    cuda: bool = False
    """A CUDA context exists in the zygote (mlx imported on MLX's CUDA backend): it refuses to
    fork, and the gateway stops it and spawns fresh interpreters instead."""
    pre_mlx: bool = False
    """The zygote stopped short of mlx (the CUDA backend): each child imports mlx itself."""


class Forked(Base, tag="forked"):
    worker_id: str
    pid: int


class ForkFailed(Base, tag="fork_failed"):
    worker_id: str
    reason: str


class Standby(Base, tag="standby"):
    """The zygote forked the intermediate of its next double fork ahead (worker/zygote.py,
    ``_Middle``): the gateway charges its own memory and reaps it if the zygote dies first."""

    pid: int


ToZygote = Fork | Shutdown
FromZygote = ZygoteHello | Forked | ForkFailed | Standby
_to_zygote = msgspec.msgpack.Decoder(ToZygote)
_from_zygote = msgspec.msgpack.Decoder(FromZygote)


def decode_to_zygote(data: bytes) -> ToZygote:
    return _to_zygote.decode(data)


def decode_from_zygote(data: bytes) -> FromZygote:
    return _from_zygote.decode(data)
