"""Output formats, forced tool calls, logprobs and count_only through the real engine
and the real SmolLM2-135M (its template has no tool support: the generic format).
One engine for the module, a recording transport; generations stay short."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from recorder import Recorder

from mlxd_worker.engines.backend import MlxBackend
from mlxd_worker.engines.engine import Engine
from mlxd_worker.io import frames

MODEL = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
TOOLS = [
    {"name": "weather", "description": "The weather in a city", "parameters": CITY},
    {"name": "time", "description": "The local time in a city", "parameters": CITY},
]
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON."}]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    assert MODEL.is_dir(), "scripts/setup imports the test model"
    e = Engine(Recorder(), MlxBackend())
    e._load({"model_path": str(MODEL), "model_name": "smollm2-135m", "options": {}})
    yield e


def recorder(engine: Engine) -> Recorder:
    assert isinstance(engine.transport, Recorder)
    return engine.transport


def submit(engine: Engine, req: dict[str, Any]) -> None:
    engine.submit(frames.GENERATE, json.dumps(req).encode())


def run(engine: Engine, *reqs: dict[str, Any], join_after: int = 0, later: tuple[dict[str, Any], ...] = ()) -> None:
    """Runs requests to the end as the engine loop would; `later` ones arrive
    after `join_after` steps (so the first ones move from the lone lane into the batch)."""
    recorder(engine).frames.clear()
    for req in reqs:
        submit(engine, req)
    steps = 0
    while True:
        if steps == join_after:
            for req in later:
                submit(engine, req)
        engine._drain_inbox(block=False)
        if not engine._by_uid and steps >= join_after:
            break
        engine._step()
        steps += 1


def of(engine: Engine, rid: int) -> dict[str, Any]:
    """Request `rid`'s output: text, frames in order, Done, calls, logprobs entries."""
    out: dict[str, Any] = {"text": "", "kinds": [], "calls": [], "logprobs": [], "done": None, "error": None}
    for kind, payload in recorder(engine).frames:
        if kind == frames.TOKEN_BATCH:
            mine = [e for e in payload if e[0] == rid]
            if mine:
                out["kinds"].append(kind)
            out["text"] += "".join(text for _, _, text in mine)
            continue
        if payload.get("id") != rid:
            continue
        out["kinds"].append(kind)
        if kind == frames.TOOL_CALL:
            out["calls"].append(payload)
        elif kind == frames.LOGPROBS:
            out["logprobs"] += payload["entries"]
        elif kind == frames.DONE:
            out["done"] = payload
        elif kind == frames.ERROR:
            out["error"] = payload
    return out


def test_a_json_schema_constrains_the_output(engine: Engine) -> None:
    fmt = {"type": "json_schema", "schema": PERSON, "strict": True}
    run(engine, {"id": 1, "messages": ASK_PERSON, "max_tokens": 24, "format": fmt})
    out = of(engine, 1)
    assert out["error"] is None and out["done"]["finish_reason"] == "stop", out
    jsonschema.validate(json.loads(out["text"]), {**PERSON, "additionalProperties": False})


def test_constrained_sequences_in_both_lanes_and_across_the_handover(engine: Engine) -> None:
    """Request 2 starts alone (lone lane) and moves into the batch mid-decode when
    3 and 4 arrive; 3 starts in the batch. Logprobs ride along in the batch (4)."""
    fmt = {"type": "json_schema", "schema": PERSON, "strict": True}
    first = {"id": 2, "messages": ASK_PERSON, "max_tokens": 24, "format": fmt}
    later = (
        {"id": 3, "messages": [{"role": "user", "content": "A person, in JSON?"}], "max_tokens": 24, "format": fmt},
        {"id": 4, "messages": ASK_WEATHER, "max_tokens": 4, "logprobs": 1},
    )
    run(engine, first, join_after=3, later=later)
    for rid in (2, 3):
        out = of(engine, rid)
        assert out["error"] is None and out["done"]["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), PERSON)
    out = of(engine, 4)
    assert len(out["logprobs"]) == out["done"]["completion_tokens"] + (out["done"]["finish_reason"] == "stop")


def test_json_object_format(engine: Engine) -> None:
    run(engine, {"id": 5, "prompt": "A JSON object with one key:", "max_tokens": 16, "format": {"type": "json_object"}})
    out = of(engine, 5)
    if out["done"]["finish_reason"] == "stop":
        assert isinstance(json.loads(out["text"]), dict)
    else:
        assert out["text"].startswith("{")


def check_call(out: dict[str, Any], names: set[str]) -> dict[str, Any]:
    assert out["done"]["finish_reason"] == "tool_calls", out
    assert len(out["calls"]) == 1, out
    call = out["calls"][0]
    assert call["name"] in names and call["index"] == 0
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call["call_id"])
    jsonschema.validate(json.loads(call["arguments"]), CITY)
    assert "<tool_call>" not in out["text"]  # held back, never streamed
    # After its tokens, before Done.
    kinds = out["kinds"]
    assert kinds[-1] == frames.DONE and kinds.index(frames.TOOL_CALL) == len(kinds) - 2
    return call


def test_a_named_function_is_called(engine: Engine) -> None:
    req = {"id": 6, "messages": ASK_WEATHER, "max_tokens": 40, "tools": TOOLS, "tool_choice": {"function": "weather"}}
    run(engine, req)
    check_call(of(engine, 6), {"weather"})


def test_required_calls_one_of_the_tools(engine: Engine) -> None:
    req = {"id": 7, "messages": ASK_WEATHER, "max_tokens": 40, "tools": TOOLS, "tool_choice": "required"}
    run(engine, req)
    check_call(of(engine, 7), {"weather", "time"})


def test_logprobs_of_a_greedy_generation(engine: Engine) -> None:
    run(engine, {"id": 8, "messages": ASK_WEATHER, "max_tokens": 6, "logprobs": 3})
    out = of(engine, 8)
    done = out["done"]
    assert len(out["logprobs"]) == done["completion_tokens"] + (done["finish_reason"] == "stop")
    # Each Logprobs frame comes right before the TokenBatch with its tokens.
    kinds = [k for k in out["kinds"] if k in (frames.LOGPROBS, frames.TOKEN_BATCH)]
    assert kinds[:2] == [frames.LOGPROBS, frames.TOKEN_BATCH]
    for entry in out["logprobs"]:
        top = entry["top"]
        assert entry["logprob"] <= 0 and len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the chosen token is the likeliest.
        assert top[0]["token"] == entry["token"] and math.isclose(top[0]["logprob"], entry["logprob"], abs_tol=1e-6)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-5
    assert "".join(e["text"] for e in out["logprobs"]).startswith(out["text"][:4])


def test_count_only_counts_what_a_generation_sees(engine: Engine) -> None:
    req = {"id": 9, "messages": ASK_WEATHER, "max_tokens": 1, "tools": TOOLS}
    run(engine, {**req, "count_only": True})
    counted = of(engine, 9)["done"]
    assert counted["finish_reason"] == "counted" and counted["completion_tokens"] == 0
    run(engine, req)
    assert of(engine, 9)["done"]["prompt_tokens"] == counted["prompt_tokens"]
    # The tools are in the prompt: without them it is shorter.
    run(engine, {**req, "count_only": True, "tool_choice": "none"})
    assert of(engine, 9)["done"]["prompt_tokens"] < counted["prompt_tokens"]


def test_done_names_the_stop_sequence_that_ended_it(engine: Engine) -> None:
    run(engine, {"id": 11, "messages": ASK_WEATHER, "max_tokens": 8, "stop": ["zzz", " "]})
    done = of(engine, 11)["done"]
    assert done["finish_reason"] == "stop" and done["stop_sequence"] == " "
    run(engine, {"id": 12, "messages": ASK_WEATHER, "max_tokens": 2})
    assert "stop_sequence" not in of(engine, 12)["done"]


def test_the_generic_tool_prompt_reaches_the_model(engine: Engine) -> None:
    history = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "name": "weather", "arguments": {"city": "X"}}],
        },
        {"role": "tool", "content": "18C, sunny", "tool_call_id": "c1", "name": "weather"},
    ]
    ids = engine._prompt_ids({"messages": history, "tools": TOOLS})
    text = engine.backend.tokenizer.decode(ids)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "X"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>" in text
    assert text.startswith("<|im_start|>system\n# Tools\n")


CYCLIC = {"$defs": {"a": {"$ref": "#/$defs/b", "description": "A"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}


def test_a_recursive_schema_through_a_property_is_a_tree_and_compiles(engine: Engine) -> None:
    planner = engine._planner
    assert planner is not None
    tree = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["name"],
    }
    grammar = planner.grammars.for_format({"type": "json_schema", "schema": tree})
    assert accepts(engine, grammar, '{"name": "a", "kids": [{"name": "b", "kids": []}]}')


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"format": {"type": "json_schema", "schema": {"type": "strin"}}}, "invalid format"),
        # References that lead back to themselves admit nothing (issue 28: these
        # were a 502 from the batch's first step).
        ({"format": {"type": "json_schema", "schema": {"$ref": "#"}}}, 'a cycle with nothing in between ("#" -> "#")'),
        (
            {"format": {"type": "json_schema", "schema": CYCLIC}},
            '("#/$defs/a" -> "#/$defs/b" -> "#/$defs/a")',
        ),
        ({"format": {"type": "json_schema", "schema": {"if": {"type": "string"}, "then": {}}}}, "Unimplemented keys"),
        ({"format": {"type": "json_schema", "schema": {"type": "string", "maxLength": 1, "minLength": 3}}}, "Unsat"),
        # Compile time grows with the grammar: a schema past the bound is refused unread.
        ({"format": {"type": "json_schema", "schema": {"enum": [f"v{i:07}" for i in range(120_000)]}}}, "1024 KiB"),
        ({"format": {"type": "xml"}}, "unknown format type"),
        ({"tools": TOOLS, "tool_choice": {"function": "nope"}}, "not among the request's tools"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"logprobs": 21}, "logprobs must be"),
    ],
)
def test_bad_requests_are_refused(engine: Engine, extra: dict[str, Any], message: str) -> None:
    recorder(engine).frames.clear()
    submit(engine, {"id": 10, "messages": ASK_WEATHER, "max_tokens": 4, **extra})
    out = of(engine, 10)
    assert out["error"] is not None and out["error"]["code"] == "invalid_request"
    assert message in out["error"]["message"]
    assert engine.inbox.empty()


def accepts(engine: Engine, grammar: str, text: str, special: list[int] = ()) -> bool:
    """Whether a fresh matcher of `grammar` takes `text`'s tokens (after `special`) and may end there."""
    planner = engine._planner
    assert planner is not None
    matcher = planner.grammars.constraint(grammar).matcher
    ids = [*special, *engine.backend.tokenizer.encode(text, add_special_tokens=False)]
    return bool(matcher.consume_tokens(ids) and matcher.is_accepting())


def test_with_tools_offered_a_format_still_allows_calls(engine: Engine) -> None:
    planner = engine._planner
    assert planner is not None
    fmt = {"type": "json_schema", "schema": PERSON}
    grammar = planner.grammars.for_format_or_calls(fmt, planner.tool_format, TOOLS)
    assert accepts(engine, grammar, '{"name": "Ann", "age": 30}')
    assert accepts(engine, grammar, '<tool_call>\n{"name": "time", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert not accepts(engine, grammar, "Hello")
    assert not accepts(engine, grammar, '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>')


def test_a_marker_that_is_a_special_token_is_matched_as_that_token(engine: Engine) -> None:
    """As for a json_tools model whose <tool_call> is a special token (Qwen's)."""
    from dataclasses import replace

    from mlxd_worker.requests.tools import ToolChoice

    planner = engine._planner
    assert planner is not None
    fmt = replace(planner.tool_format, name="json_tools", start="<|im_start|>", end="<|im_end|>")
    grammar = planner.grammars.for_forced_call(fmt, TOOLS, ToolChoice("function", "weather"))
    start, end = (engine.backend.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    body = '\n{"name": "weather", "arguments": {"city": "Oslo"}}\n'
    matcher = planner.grammars.constraint(grammar).matcher
    ids = engine.backend.tokenizer.encode(body, add_special_tokens=False)
    assert matcher.consume_tokens([start, *ids, end]) and matcher.is_accepting()
    assert grammar.startswith(f"start: <[{start}]>") and f"<[{end}]>" in grammar


def test_a_forced_call_needs_a_format_whose_calls_are_json_between_markers(engine: Engine) -> None:
    from dataclasses import replace

    from mlxd_worker.errors import RequestError
    from mlxd_worker.requests.plan import Planner

    planner = Planner(engine.backend.tokenizer, engine.backend.eos, None)
    planner.tool_format = replace(planner.tool_format, name="qwen3_coder")
    req = {"id": 13, "messages": ASK_WEATHER, "max_tokens": 4, "tools": TOOLS, "tool_choice": "required"}
    message = "tool_choice 'required' is not supported for this model's tool-call format 'qwen3_coder'"
    with pytest.raises(RequestError, match=message):
        planner.plan(req)
    assert planner.plan({**req, "tool_choice": "auto"}).constraint is None


def test_the_batch_masks_its_rows_together_as_mlx_lm_masks_them_one_by_one(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens of a batch mixing constrained and plain rows, one joining
    mid-decode: the batch that masks every row in one op (masked_batch.py) gives
    what mlx-lm's own batch gives calling each row's processor in turn."""
    from mlx_lm.generate import BatchGenerator

    from mlxd_worker.engines import masked_batch
    from mlxd_worker.requests.constraint import Grammars

    backend = engine.backend
    assert isinstance(backend, MlxBackend)
    tok = backend.tokenizer
    grammars = Grammars(tok, backend.eos)
    asks = ["Describe a person as JSON.", "Say hello.", "A city, as JSON?", "A person, in JSON?"]
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True)) for a in asks
    ]
    closed = {**PERSON, "additionalProperties": False}
    schemas: list[dict[str, Any] | None] = [closed, None, CITY, closed]
    batched_masks = 0
    one_op = masked_batch.mask_logits

    def counted(*args: Any) -> Any:
        nonlocal batched_masks
        batched_masks += 1
        return one_op(*args)

    monkeypatch.setattr(masked_batch, "mask_logits", counted)

    def generate(masked: bool) -> list[list[int]]:
        gen = BatchGenerator(backend._model, stop_tokens=[[t] for t in sorted(backend.eos)], completion_batch_size=8)
        if masked:
            gen._generation_batch = masked_batch.MaskedGenerationBatch.empty(gen.model, gen.sampler)

        def insert(rows: range) -> list[int]:
            procs: list[list[Any]] = []
            for i in rows:
                schema = schemas[i]
                if schema is None:
                    procs.append([])
                    continue
                c = grammars.constraint(grammars.for_format({"type": "json_schema", "schema": schema}))
                c.prompt_len = len(prompts[i])
                procs.append([c.processor(list(prompts[i]))])
            return list(gen.insert([prompts[i] for i in rows], max_tokens=[24] * len(rows), logits_processors=procs))

        uids = insert(range(3))
        out: dict[int, list[int]] = {}
        steps = 0
        while True:
            if steps == 4:
                uids += insert(range(3, 4))  # joins rows already decoding
            _, responses = gen.next()
            for r in responses:
                out.setdefault(r.uid, []).append(r.token)
            steps += 1
            if steps > 4 and not responses and len(out) == len(uids):
                break
        gen.close()
        return [out[u] for u in uids]

    mlx_lm_way = generate(masked=False)
    assert batched_masks == 0
    ours = generate(masked=True)
    assert batched_masks > 0
    assert ours == mlx_lm_way
    for i, tokens in enumerate(ours):
        if schemas[i] is not None:
            assert tokens[-1] in backend.eos, tokens
            jsonschema.validate(json.loads(tok.decode(tokens[:-1])), schemas[i])


def forced_greedy(engine: Engine, prompt: list[int], schema: dict[str, Any], max_tokens: int) -> list[int]:
    """What a lone constrained request should produce, built from llguidance and
    mlx-lm directly: the tokens the grammar forces go in with the previous token
    (one pass), every other token is the masked logits' argmax."""
    import llguidance.numpy as lln
    import mlx.core as mx
    from llguidance import LLMatcher
    from mlx_lm.models.cache import make_prompt_cache

    from mlxd_worker.requests.constraint import Grammars, apply_token_mask

    backend = engine.backend
    assert isinstance(backend, MlxBackend)
    grammars = Grammars(backend.tokenizer, backend.eos)
    matcher = LLMatcher(grammars.ll_tokenizer(), grammars.for_format({"type": "json_schema", "schema": schema}))
    cache = make_prompt_cache(backend._model)
    backend._model(mx.array(prompt[:-1])[None], cache=cache)

    def forced(limit: int) -> list[int]:
        ff = [t for t in matcher.compute_ff_tokens() if t not in backend.eos][:limit]
        assert matcher.consume_tokens(ff)
        return ff

    out = forced(max_tokens - 1)
    feed = [prompt[-1], *out]
    while len(out) < max_tokens:
        logits = backend._model(mx.array(feed)[None], cache=cache)[:, -1, :]
        bitmask = lln.allocate_token_bitmask(1, grammars.ll_tokenizer().vocab_size)
        lln.fill_next_token_bitmask(matcher, bitmask, 0)
        token = int(mx.argmax(apply_token_mask(logits, bitmask), axis=-1).item())
        out.append(token)
        if token in backend.eos:
            break
        assert matcher.consume_token(token)
        feed = [token, *forced(max_tokens - len(out))]
        out += feed[1:]
    return out


def test_a_lone_request_feeds_the_tokens_its_format_forces_in_one_pass(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON schema spells out its keys and punctuation: the lone lane feeds those
    tokens with the token before them instead of one pass each, and the output is
    what forced-then-greedy decoding gives (also when max_tokens cuts it short)."""
    backend = engine.backend
    assert isinstance(backend, MlxBackend)
    tok = backend.tokenizer
    prompt = list(tok.apply_chat_template(ASK_PERSON, add_generation_prompt=True))
    closed = {**PERSON, "additionalProperties": False}
    want = forced_greedy(engine, prompt, closed, 32)
    assert want[-1] in backend.eos
    passes = 0
    forward = type(backend._model).__call__

    def counted(self: Any, *args: Any, **kw: Any) -> Any:
        nonlocal passes
        passes += 1
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(backend._model), "__call__", counted)
    fmt = {"type": "json_schema", "schema": closed, "strict": True}
    run(engine, {"id": 60, "messages": ASK_PERSON, "max_tokens": 32, "format": fmt})
    out = of(engine, 60)
    assert out["error"] is None and out["done"]["finish_reason"] == "stop", out
    assert out["text"] == tok.decode(want[:-1])
    jsonschema.validate(json.loads(out["text"]), closed)
    generated = out["done"]["completion_tokens"]
    assert generated == len(want) - 1
    # Two passes for the prompt (all but its last token, then the last), then one
    # per sampled token: the forced ones (`{"name": "`, `", "age": `, ...) cost none.
    assert passes < 2 + generated - 5, (passes, generated)
    cut = len(want) // 2
    run(engine, {"id": 61, "messages": ASK_PERSON, "max_tokens": cut, "format": fmt})
    out = of(engine, 61)
    assert out["done"]["finish_reason"] == "length" and out["done"]["completion_tokens"] == cut
    assert out["text"] == tok.decode(want[:cut])
