"""A reasoning model's thinking, apart from its answer, in every dialect.

The model (thinking.py) is real mlx-lm inference whose greedy output is known:
after its chat template opens the thinking section, it writes "Let me think.",
`</think>`, then "The answer is four". So every field can be checked exactly:
the thinking where each dialect puts it, the answer alone in the content, the
thinking tokens in usage, a thinking budget ending the section early (and the
model answering after it), thinking switched off, and `reasoning = "off"`.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import ollama
from openai import OpenAI
from thinking import ANSWER, REASONING_TOKENS, THINKING

MODEL = "thinker"
ASK = [{"role": "user", "content": "What is two plus two?"}]
# The whole script and its EOS fit.
MAX = 24


def test_openai_chat_separates_thinking_and_counts_it(oai: OpenAI) -> None:
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX, temperature=0)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert message.content == ANSWER
    assert message.reasoning_content == THINKING
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    # Thinking is part of the completion: 4 words + 1 marker, then 4 answer words.
    assert r.usage.completion_tokens == REASONING_TOKENS + 4


def test_openai_stream_sends_thinking_deltas_before_the_answer(oai: OpenAI) -> None:
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=MAX,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    order: list[str] = []
    thinking, content = "", ""
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta: Any = choice.delta
            piece = getattr(delta, "reasoning_content", None)
            if piece:
                thinking += piece
                order.append("thinking")
            if delta.content:
                content += delta.content
                order.append("answer")
    assert (thinking, content) == (THINKING, ANSWER)
    assert order.index("answer") > max(i for i, kind in enumerate(order) if kind == "thinking")
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS


def test_a_thinking_budget_ends_the_section_and_the_answer_follows(oai: OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=MAX,
        temperature=0,
        extra_body={"max_reasoning_tokens": 2},
    )
    message = r.choices[0].message
    # Two thinking tokens, then the worker's </think>, then the model's answer.
    assert message.reasoning_content == "Let me"
    assert message.content == ANSWER
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 3


def test_stop_sequences_end_the_answer_not_the_thinking(oai: OpenAI) -> None:
    for stop, content, finish in ((["think"], ANSWER, "stop"), ([" answer"], "The", "stop")):
        r = oai.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=MAX,
            temperature=0,
            stop=stop,
        )
        message = r.choices[0].message
        assert message.reasoning_content == THINKING, stop
        assert (message.content, r.choices[0].finish_reason) == (content, finish), stop


def test_an_output_format_is_the_answer_even_when_the_template_opens_thinking(oai: OpenAI) -> None:
    # The template opens <think> whatever it is asked; the worker closes it in the
    # prompt, so the constrained text is the answer, not thinking.
    r = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=MAX,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"max_reasoning_tokens": 2, "chat_template_kwargs": {"enable_thinking": True}},
    )
    message = r.choices[0].message
    assert getattr(message, "reasoning_content", None) is None, message
    assert (message.content or "").startswith("{"), message
    assert r.usage is not None and r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_thinking_switched_off_gives_the_answer_alone(oai: OpenAI) -> None:
    for extra in ({"reasoning_effort": "none"}, {"chat_template_kwargs": {"enable_thinking": False}}):
        r = oai.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            max_tokens=MAX,
            temperature=0,
            extra_body=extra,
        )
        message = r.choices[0].message
        assert message.content == ANSWER, extra
        assert getattr(message, "reasoning_content", None) is None, extra
        assert r.usage is not None and r.usage.completion_tokens_details is not None
        assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_history_with_thinking_is_taken_and_bad_values_named(oai: OpenAI, daemon_url: str) -> None:
    history = ASK + [
        {"role": "assistant", "content": ANSWER, "reasoning_content": THINKING},
        {"role": "user", "content": "And two more?"},
    ]
    r = oai.chat.completions.create(model=MODEL, messages=history, max_tokens=MAX, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content == ANSWER
    for body, param in (
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"chat_template_kwargs": {"tokenize": True}}, None),
    ):
        resp = httpx.post(
            f"{daemon_url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=60
        )
        assert resp.status_code == 400, resp.text
        if param:
            assert resp.json()["error"]["param"] == param


def test_responses_reasoning_item_then_message(oai: OpenAI) -> None:
    r = oai.responses.create(model=MODEL, input="What is two plus two?", max_output_tokens=MAX, temperature=0)
    kinds = [item.type for item in r.output]
    assert kinds == ["reasoning", "message"]
    reasoning: Any = r.output[0]
    assert [c.text for c in reasoning.content] == [THINKING]
    assert r.output_text == ANSWER
    assert r.usage is not None and r.usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS

    events = list(oai.responses.create(model=MODEL, input="What is two plus two?", max_output_tokens=MAX, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == THINKING
    done = [e for e in events if e.type == "response.reasoning_text.done"]
    assert [e.text for e in done] == [THINKING]
    final: Any = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["reasoning", "message"]
    assert final.response.output_text == ANSWER
    # What Codex asks for: the summary and the content it sends back next turn.
    codex = oai.responses.create(
        model=MODEL,
        input="What is two plus two?",
        max_output_tokens=MAX,
        reasoning={"effort": "medium", "summary": "auto"},
        include=["reasoning.encrypted_content"],
        store=False,
    )
    item: Any = codex.output[0]
    assert [p.text for p in item.summary] == [THINKING] and item.encrypted_content, item
    streamed = list(
        oai.responses.create(
            model=MODEL,
            input="What is two plus two?",
            max_output_tokens=MAX,
            reasoning={"summary": "auto"},
            stream=True,
        )
    )
    summary = "".join(e.delta for e in streamed if e.type == "response.reasoning_summary_text.delta")
    assert summary == THINKING
    echoed = oai.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is two plus two?"},
            {"type": "reasoning", "id": item.id, "summary": [], "encrypted_content": item.encrypted_content},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "And two more?"},
        ],  # type: ignore[list-item]
        max_output_tokens=MAX,
    )
    assert echoed.output_text == ANSWER
    # A reasoning item sent back (as Codex does) is taken, and effort is checked.
    back = oai.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is two plus two?"},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": THINKING}],
            },
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "And two more?"},
        ],  # type: ignore[list-item]
        max_output_tokens=MAX,
        reasoning={"effort": "low"},
    )
    assert back.output_text == ANSWER


def test_anthropic_thinking_blocks(claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=MODEL, max_tokens=MAX, messages=ASK)  # type: ignore[arg-type]
    assert [b.type for b in m.content] == ["thinking", "text"]
    thinking: Any = m.content[0]
    assert thinking.thinking == THINKING
    text: Any = m.content[1]
    assert text.text == ANSWER
    assert m.stop_reason == "end_turn"

    budget = claude.messages.create(
        model=MODEL,
        max_tokens=MAX,
        messages=ASK,  # type: ignore[arg-type]
        thinking={"type": "enabled", "budget_tokens": 2},
    )
    first: Any = budget.content[0]
    assert first.thinking == "Let me"
    assert budget.content[1].type == "text"

    with claude.messages.stream(model=MODEL, max_tokens=MAX, messages=ASK) as stream:  # type: ignore[arg-type]
        kinds = []
        for event in stream:
            if event.type == "content_block_start":
                kinds.append(event.content_block.type)
        final = stream.get_final_message()
    assert kinds == ["thinking", "text"]
    streamed: Any = final.content[0]
    assert streamed.thinking == THINKING
    assert final.content[1].type == "text" and final.content[1].text == ANSWER

    off = claude.messages.create(
        model=MODEL,
        max_tokens=MAX,
        messages=ASK,  # type: ignore[arg-type]
        thinking={"type": "disabled"},
    )
    assert [b.type for b in off.content] == ["text"]
    # The thinking block of an earlier turn goes back in, signature and all.
    history = ASK + [
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": THINKING, "signature": ""}, {"type": "text", "text": ANSWER}],
        },
        {"role": "user", "content": "And two more?"},
    ]
    again = claude.messages.create(model=MODEL, max_tokens=MAX, messages=history)  # type: ignore[arg-type]
    assert [b.type for b in again.content] == ["thinking", "text"]


def test_ollama_thinking_field(olla: ollama.Client) -> None:
    r = olla.chat(model=MODEL, messages=ASK, options={"temperature": 0, "num_predict": MAX})
    assert r.message.thinking == THINKING
    assert r.message.content == ANSWER
    off = olla.chat(model=MODEL, messages=ASK, think=False, options={"num_predict": MAX})
    assert not off.message.thinking and off.message.content == ANSWER
    thinking, content = "", ""
    for chunk in olla.chat(model=MODEL, messages=ASK, think=True, stream=True, options={"num_predict": MAX}):
        thinking += chunk.message.thinking or ""
        content += chunk.message.content or ""
    assert (thinking, content) == (THINKING, ANSWER)
    g = olla.generate(model=MODEL, prompt="What is two plus two?", options={"num_predict": MAX})
    assert (g.thinking, g.response) == (THINKING, ANSWER)


def test_reasoning_off_leaves_the_text_as_written_and_models_say_the_format(oai: OpenAI, daemon_url: str) -> None:
    r = oai.chat.completions.create(model="thinker-inline", messages=ASK, max_tokens=MAX, temperature=0)  # type: ignore[arg-type]
    # The template opened the section in the prompt: the closing marker is in the text.
    assert r.choices[0].message.content == f"{THINKING}</think>{ANSWER}"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    models = {m["id"]: m for m in httpx.get(f"{daemon_url}/v1/models", timeout=30).json()["data"]}
    assert models[MODEL]["mlxd"]["reasoning"] == "<think>…</think>"
    assert models["thinker-inline"]["mlxd"]["reasoning"] is None
    print(json.dumps(models[MODEL]["mlxd"]))
