"""shared/grammar.py: schemas closed for generation, compile errors found before any worker."""

from __future__ import annotations

from mlx_supervisor.shared import grammar
from mlx_supervisor.shared.protocol import Generate, JsonFormat


def test_listed_properties_close_an_object_unless_the_schema_says_otherwise() -> None:
    schema = {"type": "object",
              "properties": {"properties": {"type": "object", "properties": {"x": {}}},
                             "open": {"type": "object", "properties": {},
                                      "additionalProperties": True},
                             "value": {"const": {"properties": {}}}},
              "$defs": {"D": {"properties": {"y": {}}}}}
    closed = grammar._closed(schema)
    assert closed["additionalProperties"] is False
    inner = closed["properties"]
    assert set(inner) == {"properties", "open", "value"}  # names are not schemas
    assert inner["properties"]["additionalProperties"] is False
    assert inner["open"]["additionalProperties"] is True
    assert inner["value"] == {"const": {"properties": {}}}  # a JSON value is left alone
    assert closed["$defs"]["D"]["additionalProperties"] is False


def test_schema_errors_and_lenient_schemas() -> None:
    assert grammar.schema_error({"type": "frob"}) is not None
    assert grammar.schema_error({"type": "string", "format": "weird"}) is not None
    assert grammar.schema_error({"type": "string", "format": "weird"}, strict=False) is None


def test_the_request_grammar_compiles() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    for req in (Generate(id="1", json_format=JsonFormat()),
                Generate(id="1", tools=tools, tool_choice="required"),
                Generate(id="1", tools=tools, tool_choice="function", tool_name="g",
                         parallel_tool_calls=False),
                Generate(id="1", tools=tools, json_format=JsonFormat(schema={"type": "array"}))):
        lark = grammar.lark(req, "<[7]>", "<[8]>")
        assert lark is not None and grammar.compile_error(lark) is None
    assert grammar.lark(Generate(id="1", tools=tools)) is None  # auto: nothing enforced
