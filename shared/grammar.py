"""llguidance grammars for constrained decoding, built from a ``Generate``'s tool and JSON fields.

Both sides use this module: the gateway compiles each JSON schema a client sent *before* any
worker sees it (a schema llguidance cannot compile is a 400 naming the parameter), and the
worker builds the one grammar a request decodes under. llguidance is a Rust library with a thin
Python layer and no mlx, so the gateway may import it (lazily: about 0.1 s).

The grammar is Lark with embedded JSON schemas (``%json {...}``):
- ``response_format`` alone: ``start: %json {schema}``;
- ``tool_choice`` required / a named function: ``start: call`` (or ``call ("\\n" call)*`` with
  ``parallel_tool_calls``), where ``call`` is the model's own markup around
  ``{"name": <const>, "arguments": <the function's parameters>}``; the markup comes from the
  worker (its tokenizer's ``tool_call_start`` / ``tool_call_end``), so only the JSON-bodied
  ``json_tools`` format (Qwen, Hermes, ...) can be enforced;
- ``tool_choice`` auto with a ``response_format``: either calls or the JSON answer;
- ``tool_choice`` auto alone: nothing until the model opens a call itself; then
  :func:`call_lark`, the rest of that call (the worker enforces it lazily).

JSON is compact (``whitespace_flexible`` off): a weak model cannot stall in whitespace. Objects
that list their properties are closed unless the schema says otherwise (:func:`_closed`).
``strict: false`` compiles leniently (keywords llguidance does not implement are ignored); tool
bodies are strict only when every function says ``strict: true``.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_supervisor.shared.protocol import Generate


def _llg() -> Any:
    from llguidance import LLMatcher

    return LLMatcher


_VALUES = ("const", "enum", "default", "examples")  # JSON values, not schemas
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _closed(node: Any) -> Any:
    """``node`` with every object that lists ``properties`` and says nothing of others closed
    (``additionalProperties: false``), as xgrammar's strict mode reads schemas: a weak model
    cannot wander into keys nobody asked for (clients rarely say it; pydantic never does)."""
    if isinstance(node, list):
        return [_closed(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _VALUES else
           {name: _closed(sub) for name, sub in v.items()} if k in _MAPS and isinstance(v, dict)
           else _closed(v) for k, v in node.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


def _with_options(schema: dict[str, Any] | None, strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = _closed(schema) if schema else {"type": "object"}
    options: dict[str, Any] = dict(out.get("x-guidance") or {})
    out["x-guidance"] = {**options, "whitespace_flexible": False, "lenient": not strict}
    return out


def schema_error(schema: dict[str, Any] | None, strict: bool = True) -> str | None:
    """Why llguidance cannot compile ``schema`` (None: it can)."""
    llg = _llg()
    try:
        grammar = llg.grammar_from_json_schema(_with_options(schema, strict))
    except (ValueError, TypeError) as e:
        return str(e)
    failed, messages = llg.validate_grammar_with_warnings(grammar)
    return "; ".join(messages) if failed else None


def _call_body(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """The schema of one call's JSON: the named function, or any of them."""
    options = []
    for tool in tools:
        fn = tool.get("function") or {}
        if name is not None and fn.get("name") != name:
            continue
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn.get("name")},
                           "arguments": fn.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _body(req: Generate, name: str | None, call_end: str) -> str:
    """A call after its start marker: ``"\\n" {"name": ..., "arguments": ...} "\\n" end``."""
    tools = req.tools or []
    strict = all((t.get("function") or {}).get("strict") for t in tools)
    body = _with_options(_call_body(tools, name), strict)
    return f'"\\n" %json {json.dumps(body)} "\\n" {call_end}'


def call_lark(req: Generate, call_end: str) -> str:
    """The grammar of one call the model opened itself (``tool_choice`` auto, enforced lazily
    from the start marker on): the rest of the call, any of the request's functions."""
    return "start: " + _body(req, None, call_end)


def lark(req: Generate, call_start: str | None = None, call_end: str | None = None) -> str | None:
    """The request's grammar (Lark), or None when nothing is enforced. ``call_start`` and
    ``call_end`` are Lark terms for the tool-call markup (``<[id]>`` for a single token)."""
    forced = req.tools and req.tool_choice in ("required", "function")
    answer = None
    if req.json_format is not None:
        answer = "%json " + json.dumps(_with_options(req.json_format.schema,
                                                     req.json_format.strict))
    calls = None
    if req.tools and req.tool_choice != "none" and (forced or answer is not None):
        if call_start is None or call_end is None:
            raise ValueError("this model's tool-call format cannot be enforced")
        calls = "call (\"\\n\" call)*" if req.parallel_tool_calls else "call"
        calls += f"\ncall: {call_start} {_body(req, req.tool_name, call_end)}"
    if calls is not None and forced:
        return "start: " + calls
    if calls is not None and answer is not None:
        return f"start: calls | answer\ncalls: {calls}\nanswer: {answer}"
    if answer is not None:
        return "start: " + answer
    return None


def compile_error(grammar: str) -> str | None:
    """Why the Lark ``grammar`` does not compile (None: it does)."""
    llg = _llg()
    failed, messages = llg.validate_grammar_with_warnings(llg.grammar_from_lark(grammar))
    return "; ".join(messages) if failed else None
