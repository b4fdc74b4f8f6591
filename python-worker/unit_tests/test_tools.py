"""Tool calls without a model: the streaming extractor on hand-written token texts,
the generic prompt format, tool_choice checks, and strict schemas."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlxd_worker.errors import RequestError
from mlxd_worker.requests import tools as tools_module
from mlxd_worker.requests.constraint import closed_objects
from mlxd_worker.requests.tool_stream import Piece, ToolCallExtractor
from mlxd_worker.requests.tools import (
    GENERIC,
    ToolCall,
    ToolChoice,
    chat_messages,
    new_call_id,
    raw_input_grammar,
    read_calls,
    tool_choice,
)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def extract(pieces: list[str]) -> list[Piece]:
    """Feeds the pieces one by one; returns everything handed on, text joined."""
    x = ToolCallExtractor(GENERIC.start, GENERIC.end, lambda text: read_calls(GENERIC, text, [WEATHER]))
    out: list[Piece] = []
    for p in [*[x.feed(p) for p in pieces], x.finish()]:
        for piece in p:
            if isinstance(piece, str) and out and isinstance(out[-1], str):
                out[-1] += piece
            else:
                out.append(piece)
    return out


def call(city: str) -> ToolCall:
    return ToolCall("get_weather", json.dumps({"city": city}))


def test_markers_split_across_pieces_with_text_before_and_after() -> None:
    pieces = [
        "Let me check. <to",
        "ol_c",
        'all>\n{"name": "get_weather", "argu',
        'ments": {"city": "Pa',
        'ris"}}\n</tool',
        "_call> Done.",
    ]
    assert extract(pieces) == ["Let me check. ", call("Paris"), " Done."]


def test_text_inside_a_call_is_never_streamed() -> None:
    x = ToolCallExtractor(GENERIC.start, GENERIC.end, lambda text: read_calls(GENERIC, text, [WEATHER]))
    assert x.feed("a <tool_call>") == ["a "]
    assert x.feed('{"name": "get_weather",') == []
    assert x.feed(' "arguments": {"city": "Oslo"}}') == []
    assert x.feed("</tool_call>") == [call("Oslo")]


def test_two_calls_in_a_row_and_in_one_piece() -> None:
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    assert extract([block % "Oslo", "\n", block % "Rome"]) == [call("Oslo"), "\n", call("Rome")]
    assert extract([block % "Oslo" + " and " + block % "Rome"]) == [call("Oslo"), " and ", call("Rome")]


def test_bad_json_inside_markers_is_passed_on_as_text() -> None:
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'
    assert extract(["x ", bad[:20], bad[20:], " y"]) == ["x " + bad + " y"]
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert extract([no_name]) == [no_name]


def test_a_partial_start_marker_is_held_then_released() -> None:
    x = ToolCallExtractor(GENERIC.start, GENERIC.end, lambda text: read_calls(GENERIC, text, [WEATHER]))
    assert x.feed("hello <tool") == ["hello "]
    assert x.finish() == ["<tool"]
    assert extract(["a <to", "day"]) == ["a <today"]
    assert extract(["<", "b>"]) == ["<b>"]


def test_an_unterminated_call_is_read_if_it_can_be_else_it_is_text() -> None:
    assert extract(['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n']) == [call("Lima")]
    cut = 'ok <tool_call>\n{"name": "get_weather", "argu'
    assert extract([cut]) == [cut]


def test_a_format_without_end_marker_runs_to_the_end() -> None:
    x = ToolCallExtractor("[TOOL_CALLS]", "", lambda text: [ToolCall("f", text.strip())])
    assert x.feed("hi [TOOL_") == ["hi "]
    assert x.feed('CALLS] {"a": 1}') == []
    assert x.finish() == [ToolCall("f", '{"a": 1}')]


def test_arguments_as_text_and_parameters_are_accepted() -> None:
    assert read_calls(GENERIC, '{"name": "f", "arguments": "{\\"a\\": 1}"}', []) == [ToolCall("f", '{"a": 1}')]
    assert read_calls(GENERIC, '{"name": "f", "parameters": {"a": 1}}', []) == [ToolCall("f", '{"a": 1}')]
    assert read_calls(GENERIC, '{"name": "f"}', []) == [ToolCall("f", "{}")]
    with pytest.raises(ValueError):
        read_calls(GENERIC, '{"name": "f", "arguments": [1]}', [])


def test_generic_rendering_of_a_history_with_calls_and_results() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}},
                {"id": "call_2", "name": "get_weather", "arguments": {"city": "Rome"}},
            ],
        },
        {"role": "tool", "content": "18°C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "24°C", "tool_call_id": "call_2", "name": "get_weather"},
    ]
    messages, extra = chat_messages(history, [WEATHER], GENERIC)
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n")
    assert json.dumps({**{"name": "get_weather"}, **{k: WEATHER[k] for k in ("parameters", "description")}}) in system
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert messages[3]["content"] == "<tool_response>\n18°C\n</tool_response>\n<tool_response>\n24°C\n</tool_response>"


def test_without_tools_offered_no_block_is_added_but_history_still_renders() -> None:
    history = [
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "c", "name": "f", "arguments": {}}]},
        {"role": "tool", "content": "ok"},
    ]
    messages, _ = chat_messages(history, [], GENERIC)
    assert messages == [
        {"role": "assistant", "content": 'Checking.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},
    ]


def test_the_documented_generic_format_is_the_one_rendered() -> None:
    system = chat_messages([{"role": "user", "content": "hi"}], [WEATHER], GENERIC)[0][0]["content"]
    doc = tools_module.__doc__ or ""
    for line in system.splitlines():
        if line and not line.startswith('{"name": "get_weather"'):
            assert f"    {line}\n" in doc, f"the module docstring no longer shows: {line}"


def test_tool_choice_is_checked_against_the_tools() -> None:
    assert tool_choice(None, []).mode == "auto"
    assert tool_choice("none", []).mode == "none"
    assert tool_choice({"function": "get_weather"}, [WEATHER]).function == "get_weather"
    with pytest.raises(RequestError, match="not among the request's tools"):
        tool_choice({"function": "nope"}, [WEATHER])
    with pytest.raises(RequestError, match="needs tools"):
        tool_choice("required", [])
    with pytest.raises(RequestError, match="unknown tool_choice"):
        tool_choice("sometimes", [WEATHER])


def test_call_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("call_") and len(i) == 29 and i[5:].isalnum() for i in ids)


def test_strict_closes_every_object_schema_that_leaves_it_open() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "c": {"type": "array", "items": {"type": "object"}},
            "d": {"type": "object", "additionalProperties": True},
            "e": {"anyOf": [{"type": "object"}, {"type": "null"}]},
        },
        "$defs": {"x": {"properties": {"y": {"type": "integer"}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["d"]["additionalProperties"] is True
    assert closed["properties"]["e"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["e"]["anyOf"][1]
    assert closed["$defs"]["x"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy


def test_a_model_with_its_own_format_gets_openai_tools_and_hf_tool_calls() -> None:
    from types import SimpleNamespace

    from mlx_lm.tool_parsers import json_tools

    tokenizer = SimpleNamespace(
        has_tool_calling=True,
        tool_parser=json_tools.parse_tool_call,
        tool_call_start=json_tools.tool_call_start,
        tool_call_end=json_tools.tool_call_end,
    )
    fmt = tools_module.tool_format(tokenizer)
    assert (fmt.name, fmt.native, fmt.json_in_markers) == ("json_tools", True, True)
    history = [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "f", "arguments": {"a": 1}}]},
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "f"},
    ]
    messages, extra = chat_messages(history, [WEATHER], fmt)
    assert extra == {"tools": [{"type": "function", "function": WEATHER}]}
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}],
        },
        {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "f"},
    ]
    assert read_calls(fmt, '\n{"name": "f", "arguments": {"a": 1}}\n', [WEATHER]) == [ToolCall("f", '{"a": 1}')]


def test_a_raw_custom_call_is_read_for_a_tool_with_a_lark_grammar() -> None:
    lark: Any = {"name": "apply_patch", "parameters": {"type": "object"}, "lark": "start: /.+/"}
    plain: Any = {"name": "shout", "parameters": {"type": "object"}}
    body = '*** Begin Patch\n+ "quoted"\n*** End Patch'
    assert read_calls(GENERIC, f"\napply_patch\n{body}\n", [plain, lark]) == [
        ToolCall("apply_patch", json.dumps({"input": body}))
    ]
    # Only a tool with a grammar is read raw; JSON calls still read as ever.
    with pytest.raises(ValueError):
        read_calls(GENERIC, "\nshout\nHEY\n", [plain, lark])
    assert raw_input_grammar([plain, lark], ToolChoice("function", "apply_patch")) == "start: /.+/"
    assert raw_input_grammar([plain, lark], ToolChoice("function", "shout")) is None
    assert raw_input_grammar([plain, lark], ToolChoice("required")) is None
