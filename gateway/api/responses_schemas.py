"""OpenAI Responses request bodies as msgspec Structs (https://platform.openai.com/docs/api-reference/responses).

Unknown fields are ignored, as for every body here; a wrong type is a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Part(msgspec.Struct, kw_only=True):
    """A content part: ``input_text``/``output_text`` (text), ``input_image`` (image_url)."""

    type: str
    text: str | None = None
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None


class Item(msgspec.Struct, kw_only=True):
    """An input item: a message (``type`` may be left out), ``function_call``,
    ``function_call_output`` or ``reasoning``; which fields matter depends on ``type``."""

    type: str | None = None
    role: str | None = None
    content: str | list[Part] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[Part] | None = None
    status: str | None = None
    summary: Any = None
    encrypted_content: str | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class Format(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    format: Format | None = None
    verbosity: str | None = None


class Reasoning(msgspec.Struct, kw_only=True):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Item]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: str | None = None
    reasoning: Reasoning | None = None
    include: list[str] | None = None
    background: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
