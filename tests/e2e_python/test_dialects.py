"""Agent-framework dialects, driven by the official openai, anthropic and ollama
clients against the real model: forced tool calls (streamed and not), tool
results fed back, JSON schemas, logprobs, and 400s that name the field."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import ollama
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from pydantic import BaseModel

MODEL = "smollm2-135m"
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": CITY_SCHEMA},
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time in a time zone", "parameters": TIME_SCHEMA},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# Enough for the call's markers, name and a short argument.
CALL_TOKENS = 48
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def assert_weather_call(name: str, arguments: Any) -> None:
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, CITY_SCHEMA)


# -- OpenAI chat completions ----------------------------------------------------


def test_openai_forced_tool_call(oai: OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=CALL_TOKENS,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].id and calls[0].type == "function"
    assert_weather_call(calls[0].function.name, calls[0].function.arguments)


def test_openai_forced_tool_call_streamed(oai: OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=CALL_TOKENS,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finishes = []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert finishes == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["id"]
    assert_weather_call(calls[0]["name"], calls[0]["arguments"])


def test_openai_required_picks_one_of_the_tools(oai: OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it in Berlin?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        max_tokens=CALL_TOKENS,
    )
    calls = resp.choices[0].message.tool_calls or []
    assert calls, resp
    schema = {"get_weather": CITY_SCHEMA, "get_time": TIME_SCHEMA}[calls[0].function.name]
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)


def test_openai_tool_result_is_answered(oai: OpenAI) -> None:
    history: list[Any] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees Celsius and sunny"},
    ]
    resp = oai.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=16
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert not choice.message.tool_calls
    assert (choice.message.content or "").strip()
    # The result reached the prompt: the same turn without it is shorter.
    without = oai.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1)
    assert resp.usage is not None and without.usage is not None
    assert resp.usage.prompt_tokens > without.usage.prompt_tokens + 10


def test_openai_json_schema_response_validates(oai: OpenAI) -> None:
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
        max_tokens=40,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)


def test_openai_json_object_response_parses(oai: OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with a key 'a'."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON: {text!r}")
    assert isinstance(value, dict)


def test_openai_chat_logprobs(oai: OpenAI) -> None:
    resp = oai.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert resp.usage is not None
    # One entry per generated token (an EOS that ends it counts, not shown as text).
    assert len(entries) in (resp.usage.completion_tokens, resp.usage.completion_tokens + 1)
    assert "".join(e.token for e in entries).startswith((choice.message.content or "")[:8])
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(e.logprob, tops[0], abs_tol=1e-4)
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-3


def test_openai_completion_logprobs(oai: OpenAI) -> None:
    resp = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(x is not None and x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]}, "tool_choice"),
    ],
)
def test_openai_unsupported_fields_are_400_naming_the_field(oai: OpenAI, extra: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, extra_body=extra)
    body = err.value.body
    assert isinstance(body, dict) and body.get("param") == field, body
    assert body["type"] == "invalid_request_error" and body["message"]


def test_openai_image_part_without_an_image_is_400(oai: OpenAI) -> None:
    """(Images themselves: test_vision.py.)"""
    with pytest.raises(BadRequestError, match="base64"):
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
            max_tokens=4,
        )


# -- OpenAI responses -----------------------------------------------------------

RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather",
    "parameters": CITY_SCHEMA,
}


def test_responses_text(oai: OpenAI) -> None:
    resp = oai.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=12)
    assert "Paris" in resp.output_text
    assert resp.usage is not None and resp.usage.output_tokens >= 1
    # A message cut by max_output_tokens is incomplete, as its response is.
    cut = oai.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3)
    assert cut.status == "incomplete" and cut.output[-1].status == "incomplete", cut


def test_responses_forced_function_call_and_its_output_answered(oai: OpenAI) -> None:
    resp = oai.responses.create(
        model=MODEL,
        input=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=CALL_TOKENS,
    )
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1
    assert_weather_call(calls[0].name, calls[0].arguments)
    follow = oai.responses.create(
        model=MODEL,
        input=[
            *ASK_WEATHER,
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"},
        ],  # type: ignore[arg-type]
        max_output_tokens=12,
    )
    assert follow.output_text.strip()


def test_responses_streamed_function_call(oai: OpenAI) -> None:
    with oai.responses.stream(
        model=MODEL,
        input=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=CALL_TOKENS,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.done" in kinds
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 1
    assert_weather_call(calls[0].name, calls[0].arguments)


def test_responses_json_schema(oai: OpenAI) -> None:
    resp = oai.responses.create(
        model=MODEL,
        input="Describe a person as JSON.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        max_output_tokens=40,
    )
    jsonschema.validate(json.loads(resp.output_text), PERSON_SCHEMA)


def test_responses_previous_response_id_is_400(oai: OpenAI) -> None:
    with pytest.raises(BadRequestError, match="previous_response_id"):
        oai.responses.create(model=MODEL, input="hi", previous_response_id="resp_1", max_output_tokens=4)


# -- Anthropic messages ---------------------------------------------------------

ANTHROPIC_TOOL = {"name": "get_weather", "description": "Current weather in a city", "input_schema": CITY_SCHEMA}


def test_anthropic_text_names_paris(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=12,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and "Paris" in msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0


def test_anthropic_stop_sequence(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stop_sequences=["Paris"],
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "Paris"
    assert "Paris" not in msg.content[0].text  # type: ignore[union-attr]


def test_anthropic_forced_tool_use(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=CALL_TOKENS,
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].id
    assert_weather_call(uses[0].name, uses[0].input)


def test_anthropic_streamed_tool_use_then_result_answered(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=MODEL,
        max_tokens=CALL_TOKENS,
        messages=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "any"},
    ) as stream:
        first = next(iter(stream))
        final = stream.get_final_message()
    # message_start carries the prompt's size, known before any token (Claude Code
    # sizes its context by it).
    assert first.type == "message_start"
    start, end = first.message.usage, final.usage
    prompt = start.input_tokens + (start.cache_read_input_tokens or 0)
    assert prompt == end.input_tokens + (end.cache_read_input_tokens or 0)
    assert start.input_tokens > 0 and start.output_tokens == 0
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    assert_weather_call(use.name, use.input)
    answer = claude.messages.create(
        model=MODEL,
        max_tokens=16,
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
        messages=[
            *ASK_WEATHER,
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}],
            },
        ],  # type: ignore[list-item]
        tool_choice={"type": "none"},
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content and answer.content[0].type == "text" and answer.content[0].text.strip()


def test_anthropic_count_tokens_matches_usage(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    counted = claude.messages.count_tokens(model=MODEL, system="Answer briefly.", messages=messages)  # type: ignore[arg-type]
    msg = claude.messages.create(model=MODEL, max_tokens=1, system="Answer briefly.", messages=messages)  # type: ignore[arg-type]
    # Anthropic reports prompt tokens read from the prefix cache apart.
    assert counted.input_tokens == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 0
    with_tools = claude.messages.count_tokens(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
    )
    assert with_tools.input_tokens > counted.input_tokens


def test_anthropic_errors_in_anthropic_shape(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": 5}
        )
    error = bad.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and "top_k" in error["message"]


# -- Ollama -----------------------------------------------------------------------


def test_ollama_chat_streams_ndjson(olla: ollama.Client) -> None:
    parts = list(
        olla.chat(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            stream=True,
            options={"num_predict": 12, "temperature": 0},
        )
    )
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content or "" for p in parts)
    assert "Paris" in text
    assert parts[-1].eval_count and parts[-1].prompt_eval_count and parts[-1].done_reason in ("stop", "length")


def test_ollama_generate_with_stop(olla: ollama.Client) -> None:
    resp = olla.generate(
        model=MODEL, prompt="What is the capital of France?", options={"num_predict": 16, "stop": ["Paris"]}
    )
    assert resp.done and "Paris" not in resp.response
    raw = olla.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"num_predict": 4})
    assert raw.done and raw.eval_count and raw.eval_count <= 4


def test_ollama_format_schema_validates(olla: ollama.Client) -> None:
    resp = olla.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        format=PERSON_SCHEMA,
        options={"num_predict": 40},
    )
    jsonschema.validate(json.loads(resp.message.content or ""), PERSON_SCHEMA)
    as_json = olla.generate(
        model=MODEL, prompt='Reply with the JSON object {"ok": true}.', format="json", options={"num_predict": 64}
    )
    assert as_json.done_reason == "stop", as_json
    assert isinstance(json.loads(as_json.response), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_forced_tool_call(olla: ollama.Client, stream: bool) -> None:
    # Ollama has no tool_choice; mlxd takes OpenAI's as an extension. The official
    # client's own request path parses the answer (its chat() has no such argument).
    body = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "options": {"num_predict": CALL_TOKENS},
        "stream": stream,
    }
    got = olla._request(ollama.ChatResponse, "POST", "/api/chat", json=body, stream=stream)
    parts = list(got) if stream else [got]
    assert parts[-1].done and all(not p.done for p in parts[:-1])
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1
    assert_weather_call(calls[0].function.name, calls[0].function.arguments)


def test_ollama_tool_result_is_answered(olla: ollama.Client) -> None:
    resp = olla.chat(
        model=MODEL,
        messages=[
            *ASK_WEATHER,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
        ],
        tools=[WEATHER_TOOL],
        options={"num_predict": 16},
    )
    assert resp.done and ((resp.message.content or "").strip() or resp.message.tool_calls)


def test_ollama_models_and_version(olla: ollama.Client) -> None:
    names = [m.model for m in olla.list().models]
    assert MODEL in names
    show = olla.show(MODEL)
    assert show.details is not None and show.details.family == "llama"
    assert "tools" in (show.capabilities or [])
    running = [m.model for m in olla.ps().models]
    assert MODEL in running  # the tests above loaded it
    assert olla._client.get("/api/version").json()["version"]


def test_ollama_errors(olla: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        olla.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        olla.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], options={"top_k": 40})
    assert bad.value.status_code == 400 and "top_k" in bad.value.error


def test_not_found_is_a_404_in_openai_shape(oai: OpenAI) -> None:
    with pytest.raises(NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=ASK_WEATHER, max_tokens=4)


def test_ollama_routes_take_json_posted_as_a_form_as_curl_d_does(daemon_url: str) -> None:
    body = json.dumps({"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(f"{daemon_url}/api/generate", content=body, headers=headers, timeout=120)
        assert r.status_code == 200, (headers, r.text)
        assert r.json()["done"] is True
    # Elsewhere a JSON body still needs its Content-Type.
    r = httpx.post(
        f"{daemon_url}/v1/chat/completions",
        content=json.dumps({"model": MODEL, "messages": ASK_WEATHER}),
        headers={"Content-Type": "text/plain"},
        timeout=60,
    )
    assert r.status_code == 415, r.text


def test_claude_codes_request_shapes_are_served(claude: anthropic.Anthropic) -> None:
    # output_config.format (what messages.parse sends), a system message mid-conversation,
    # cache_control hints and context_management, all at once.
    messages: Any = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Think of a person.", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "assistant", "content": "Done."},
        {"role": "system", "content": "Answer with JSON only."},
        {"role": "user", "content": "Who is it?"},
    ]
    m = claude.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=messages,
        extra_body={
            "output_config": {"format": {"type": "json_schema", "schema": PERSON_SCHEMA}},
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        },
    )
    block: Any = m.content[0]
    jsonschema.validate(json.loads(block.text), PERSON_SCHEMA)
    # max_tokens past the context is clamped to what is left, not refused.
    long = claude.messages.create(model=MODEL, max_tokens=20_000, messages=ASK_WEATHER, stop_sequences=[" "])  # type: ignore[arg-type]
    assert long.stop_reason in ("stop_sequence", "end_turn"), long
    # A prompt past the context: Anthropic's wording, which Claude Code compacts on.
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "word " * 9000}])
    assert re.search(r"prompt is too long: \d+ tokens > 8191 maximum", str(err.value)), err.value


class Pioneer(BaseModel):
    name: Literal["Ada", "Grace"]
    age: Literal[36, 85]


def test_anthropic_messages_parse_returns_its_typed_output(claude: anthropic.Anthropic) -> None:
    # The SDK's own structured-output call (it sends output_config.format).
    ask = [{"role": "user", "content": "Name a computing pioneer and her age."}]
    m = claude.messages.parse(model=MODEL, max_tokens=40, messages=ask, output_format=Pioneer)  # type: ignore[arg-type]
    assert isinstance(m.parsed_output, Pioneer), m.content


@pytest.mark.parametrize(
    "syntax,definition,allowed",
    [
        ("regex", "[A-Z]{3,8}", "[A-Z]{3,8}"),
        ("lark", 'start: "HELLO " NAME "!"\nNAME: /[A-Z][a-z]{1,8}/', "HELLO [A-Z][a-z]{1,8}!"),
    ],
)
def test_a_custom_tool_is_called_with_input_its_grammar_allows(
    oai: OpenAI, syntax: str, definition: str, allowed: str
) -> None:
    # A freeform tool (Codex's kind): the call carries its input as text, and the
    # tool's grammar holds a forced call's input to it.
    shout = {
        "type": "custom",
        "name": "shout",
        "description": "Shout a greeting",
        "format": {"type": "grammar", "syntax": syntax, "definition": definition},
    }
    for stream in (False, True):
        args: Any = dict(
            model=MODEL,
            input="Shout a greeting.",
            tools=[shout],
            tool_choice={"type": "custom", "name": "shout"},
            max_output_tokens=CALL_TOKENS,
        )
        if stream:
            with oai.responses.stream(**args) as events:
                resp = events.get_final_response()
        else:
            resp = oai.responses.create(**args)
        calls: list[Any] = [item for item in resp.output if item.type == "custom_tool_call"]
        assert len(calls) == 1 and calls[0].name == "shout", resp.output
        assert re.fullmatch(allowed, calls[0].input), calls[0].input


def test_a_forced_call_wins_over_an_output_format(oai: OpenAI) -> None:
    # instructor's RESPONSES_TOOLS mode: a forced tool and text.format together.
    resp = oai.responses.create(
        model=MODEL,
        input=ASK_WEATHER,  # type: ignore[arg-type]
        tools=[RESPONSES_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA}},
        max_output_tokens=CALL_TOKENS,
    )
    calls = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1, resp.output
    assert_weather_call(calls[0].name, calls[0].arguments)
