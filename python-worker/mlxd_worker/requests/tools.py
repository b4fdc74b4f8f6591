"""Tool calling: how a request's tools reach the prompt, and how the model's calls
are read back out of its text.

A model's own format
--------------------
When mlx-lm found a tool parser for the tokenizer at load (``tool_parser_type`` in
the tokenizer config, or inferred from the chat template: ``has_tool_calling``),
the chat template renders the tools (OpenAI function form) and the history's calls
(Hugging Face form, arguments as an object), and the parser mlx-lm chose reads the
text between its ``tool_call_start`` and ``tool_call_end`` markers.

The generic format
------------------
For chat templates without tool support (SmolLM2's, for one), the tools go into
the system prompt. The block below is appended to the request's first system
message (after a blank line), or becomes the system message when there is none::

    # Tools

    You may call the functions below, each described by a JSON object on its own line:
    <tools>
    {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", ...}}
    </tools>

    To call a function, answer with its name and arguments as a JSON object inside <tool_call></tool_call> tags:
    <tool_call>
    {"name": "<function name>", "arguments": <the arguments as a JSON object>}
    </tool_call>
    Write one block per call. Results come back in the next user turn, inside <tool_response></tool_response> tags.

The conversation so far is rendered the same way: an assistant turn that made
calls is its text (if any) followed by one block per call, joined by newlines::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and a run of tool results (role "tool") becomes one user turn, one block per
result in the order of the calls, joined by newlines::

    <tool_response>
    18°C and sunny
    </tool_response>

JSON is written as ``json.dumps(..., ensure_ascii=False)`` writes it. The model's
answer is read the same way: text between ``<tool_call>`` and ``</tool_call>``
must be a JSON object with a string "name" and an object "arguments". With
tool_choice "none" the tools are not rendered and nothing is read back.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypedDict

from ..errors import RequestError
from ..io import protocol
from ..io.protocol import ChatMessage, Tool

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper

GENERIC_START = "<tool_call>"
GENERIC_END = "</tool_call>"

# Formats whose calls are a JSON object between two markers: the ones a forced call
# can be written as a grammar for.
JSON_IN_MARKERS = ("generic", "json_tools")

_TOOLS_PROMPT = """# Tools

You may call the functions below, each described by a JSON object on its own line:
<tools>
{tools}
</tools>

To call a function, answer with its name and arguments as a JSON object inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Write one block per call. Results come back in the next user turn, inside <tool_response></tool_response> tags."""

_CALL_ID_ALPHABET = string.ascii_letters + string.digits


class _FunctionRequired(TypedDict):
    name: str
    parameters: dict[str, Any]  # a JSON schema


class Function(_FunctionRequired, total=False):
    description: str


class OpenAITool(TypedDict):
    """A tool in OpenAI function form, as chat templates and mlx-lm's parsers take it."""

    type: str  # "function"
    function: Function


class _TemplateCall(TypedDict):
    name: str
    arguments: Any  # a JSON object


class TemplateToolCall(TypedDict):
    """A call in the history, in the Hugging Face form chat templates render."""

    id: str
    type: str  # "function"
    function: _TemplateCall


class _TemplateMessageRequired(TypedDict):
    role: str
    content: str


class TemplateMessage(_TemplateMessageRequired, total=False):
    """A message as the chat template gets it."""

    tool_calls: list[TemplateToolCall]
    tool_call_id: str
    name: str
    # An assistant turn's thinking, under the name chat templates read (Qwen3's
    # keeps it for the turns of the current tool-call round).
    reasoning_content: str


# mlx-lm's parse_tool_call(text, tools): a call dict or a list of them (or anything,
# from text the model got wrong).
ToolParser = Callable[[str, list[OpenAITool]], object]


@dataclass(frozen=True)
class ToolFormat:
    """How one model writes tool calls."""

    # "generic", or the name of mlx-lm's parser module (json_tools, qwen3_coder, ...).
    name: str
    start: str
    # Empty: a call runs to the end of the output (mistral's format).
    end: str
    # The chat template renders tools and tool calls itself.
    native: bool
    parse: ToolParser

    @property
    def json_in_markers(self) -> bool:
        return self.name in JSON_IN_MARKERS


@dataclass(frozen=True)
class ToolCall:
    name: str
    # The arguments as JSON text (an object).
    arguments: str


@dataclass(frozen=True)
class ToolChoice:
    # "auto", "none", "required" or "function" (then `function` names it).
    mode: str
    function: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    def label(self) -> str:
        """As the request wrote it, for messages."""
        return f"'{self.mode}'" if self.function is None else json.dumps({"function": self.function})


def _parse_generic(text: str, tools: object = None) -> object:
    return json.loads(text)


GENERIC = ToolFormat("generic", GENERIC_START, GENERIC_END, native=False, parse=_parse_generic)


def tool_format(tokenizer: TokenizerWrapper) -> ToolFormat:
    """The model's own format when mlx-lm has a parser for it, else the generic one."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return GENERIC
    parser = tokenizer.tool_parser
    name = str(getattr(parser, "__module__", "") or "native").rsplit(".", 1)[-1]
    return ToolFormat(name, tokenizer.tool_call_start, tokenizer.tool_call_end or "", native=True, parse=parser)


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(24))


def tool_choice(value: protocol.ToolChoice | None, tools: list[Tool]) -> ToolChoice:
    """The request's tool_choice, checked against its tools. Absent means "auto"."""
    if value is None or value == "auto":
        return ToolChoice("auto")
    if value == "none":
        return ToolChoice("none")
    if value == "required":
        choice = ToolChoice("required")
    elif isinstance(value, dict) and isinstance(value.get("function"), str):
        choice = ToolChoice("function", value["function"])
    else:
        raise RequestError(f"unknown tool_choice {json.dumps(value)}")
    if not tools:
        raise RequestError(f"tool_choice {choice.label()} needs tools, and the request has none")
    if choice.function is not None and choice.function not in {t["name"] for t in tools}:
        raise RequestError(f"tool_choice names function '{choice.function}', which is not among the request's tools")
    return choice


def openai_tools(tools: list[Tool]) -> list[OpenAITool]:
    """Tools in OpenAI function form, as chat templates and mlx-lm's parsers take them."""
    out: list[OpenAITool] = []
    for t in tools:
        function: Function = {"name": t["name"], "parameters": t.get("parameters") or {"type": "object"}}
        description = t.get("description")
        if description:
            function["description"] = description
        out.append({"type": "function", "function": function})
    return out


def chat_messages(
    messages: list[ChatMessage], tools: list[Tool], fmt: ToolFormat
) -> tuple[list[TemplateMessage], dict[str, list[OpenAITool]]]:
    """The messages to hand the chat template, and its extra arguments (the tools,
    for a template that renders them). `tools` are the ones to offer (none with
    tool_choice "none"); calls and results in the history are rendered either way."""
    if fmt.native:
        extra = {"tools": openai_tools(tools)} if tools else {}
        return [_native_message(m) for m in messages], extra
    return _generic_messages(messages, tools), {}


def _native_message(m: ChatMessage) -> TemplateMessage:
    out: TemplateMessage = {"role": m["role"], "content": m.get("content") or ""}
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in m["tool_calls"]
        ]
    call_id, name = m.get("tool_call_id"), m.get("name")
    if call_id:
        out["tool_call_id"] = call_id
    if name:
        out["name"] = name
    if m.get("reasoning"):
        out["reasoning_content"] = m["reasoning"] or ""
    return out


def call_block(name: str, arguments: object) -> str:
    """One call in the generic format."""
    return f"{GENERIC_START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{GENERIC_END}"


def _generic_messages(messages: list[ChatMessage], tools: list[Tool]) -> list[TemplateMessage]:
    out: list[TemplateMessage] = []
    results_open = False  # the last message out is a user turn of tool results
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if results_open:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
                results_open = True
            continue
        results_open = False
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_block(c["name"], c["arguments"]) for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        message: TemplateMessage = {"role": role, "content": content}
        if m.get("reasoning"):
            message["reasoning_content"] = m["reasoning"] or ""
        out.append(message)
    if tools:
        lines = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in openai_tools(tools))
        block = _TOOLS_PROMPT.format(tools=lines)
        if out and out[0]["role"] == "system":
            first = out[0]["content"]
            out[0] = {"role": "system", "content": f"{first}\n\n{block}" if first else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def raw_input_grammar(tools: list[Tool], choice: ToolChoice) -> str | None:
    """The Lark grammar of the custom tool a call is forced to, when it has one."""
    if choice.function is None:
        return None
    return next((t.get("lark") for t in tools if t["name"] == choice.function), None)


def read_calls(fmt: ToolFormat, text: str, tools: list[Tool]) -> list[ToolCall]:
    """The calls in the text between one pair of markers. ValueError when it is not
    a call (the caller then passes the text on as content)."""
    # A custom tool's call written raw (a forced call to a tool with a Lark
    # grammar): "\n<name>\n<input>\n" between the markers.
    for t in tools:
        head = f"\n{t['name']}\n"
        if t.get("lark") and text.startswith(head) and text.endswith("\n"):
            return [ToolCall(t["name"], json.dumps({"input": text[len(head) : -1]}, ensure_ascii=False))]
    try:
        parsed = fmt.parse(text, openai_tools(tools))
    except Exception as e:  # a parser may raise anything on text it cannot read
        raise ValueError(f"not a tool call ({type(e).__name__}: {e})") from e
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise ValueError("no tool call in the text")
    return [_as_call(p) for p in items]


def _as_call(parsed: object) -> ToolCall:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str) or not parsed["name"]:
        raise ValueError("a tool call needs a name")
    # Some models write "parameters" (the word the tool list uses) for "arguments".
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments must be a JSON object")
    return ToolCall(parsed["name"], json.dumps(arguments, ensure_ascii=False))


def call_schema(tools: list[Tool], choice: ToolChoice) -> dict[str, Any]:
    """JSON schema of the object a forced call writes between the markers: the
    chosen function's name and its parameters (any of the tools for "required")."""
    chosen = tools if choice.function is None else [t for t in tools if t["name"] == choice.function]
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}
