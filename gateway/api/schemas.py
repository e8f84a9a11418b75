"""OpenAI request bodies as msgspec Structs, and their validation.

Unknown fields are ignored (clients send many); a wrong type is a 400 that names the field.
Semantic checks (ranges, n == 1, exactly-one-of) live in ``validate_*`` so each error says
which parameter is wrong and what would be right.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from mlx_supervisor.gateway.errors import APIError, bad_request

MAX_STOP = 16
MAX_TOKENS_CAP = 1 << 20
# Integers bound for the worker travel as msgpack, which stops at 64 bits: bound them here so an
# absurd value is a 400 naming its field, not an OverflowError (500) at encode time.
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCallIn(msgspec.Struct):
    """An earlier assistant turn's call (``messages[i].tool_calls[j]``)."""

    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    type: str
    function: FunctionDef | None = None


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    """``{"type": "function", "function": {"name": ...}}``."""

    type: str
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    """``text``, ``json_object`` or ``json_schema``."""
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Sampling(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatRequest(Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[str | TokenId | list[TokenId]]
    """A string, token ids, or a list holding one of those (msgspec takes one array type per union)."""
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[str | TokenId | list[TokenId]]
    encoding_format: str = "float"
    dimensions: Annotated[int, msgspec.Meta(lt=2**32)] | None = None
    user: str | None = None


T = TypeVar("T")


def decode(body: bytes, typ: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as e:
        text = str(e)
        param = None
        if " - at `$." in text:
            text, _, path = text.rpartition(" - at `$.")
            param = path.rstrip("`")
        elif "Object missing required field" in text:
            param = text.rsplit("`", 2)[-2] if text.count("`") >= 2 else None
        raise APIError(400, f"invalid request: {text}" + (f" (at {param!r})" if param else ""),
                       param=param, code="invalid_type") from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise too_deep() from None


def too_deep() -> APIError:
    """msgspec gives up on JSON nested deeper than the interpreter's recursion limit (about
    1000 levels) with ``RecursionError``; no request of ours nests more than a few levels."""
    return APIError(400, "request body is nested too deeply (arrays or objects more than about "
                    "1000 levels deep)", code="invalid_json")


def _range(value: float | None, name: str, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if value != value or value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_request(f"{name} must be in {bound}, got {value}", name)


def stop_list(stop: str | list[str] | None) -> list[str]:
    words = [stop] if isinstance(stop, str) else list(stop or [])
    if len(words) > MAX_STOP:
        raise bad_request(f"stop allows at most {MAX_STOP} strings, got {len(words)}", "stop")
    if any(not w for w in words):
        raise bad_request("stop strings must not be empty", "stop")
    return words


def validate_sampling(r: Sampling, max_tokens: int | None) -> None:
    if r.n is not None and r.n != 1:
        raise bad_request(f"only n = 1 is supported, got {r.n}", "n", code="unsupported_value")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise bad_request(f"max_tokens must be between 1 and {MAX_TOKENS_CAP}, got {max_tokens}",
                          "max_tokens")
    _range(r.temperature, "temperature", 0.0, 2.0)
    _range(r.top_p, "top_p", 0.0, 1.0, lo_open=True)
    _range(r.min_p, "min_p", 0.0, 1.0)
    _range(r.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    _range(r.presence_penalty, "presence_penalty", -2.0, 2.0)
    _range(r.repetition_penalty, "repetition_penalty", 0.0, 10.0, lo_open=True)
    if r.top_k is not None and not 0 <= r.top_k < 2**32:
        raise bad_request(f"top_k must be >= 0 (and < 2**32), got {r.top_k}", "top_k")
    if r.seed is not None and not -(2**63) <= r.seed < 2**64:
        raise bad_request("seed is out of range", "seed")
    stop_list(r.stop)


def logit_bias(r: Sampling) -> dict[int, float] | None:
    if not r.logit_bias:
        return None
    out: dict[int, float] = {}
    for k, v in r.logit_bias.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
        if not 0 <= tid < 2**32 or not -100 <= v <= 100:
            raise bad_request(f"logit_bias[{k}] must be a token id >= 0 with a bias in [-100, 100]",
                              "logit_bias")
        out[tid] = v
    return out
