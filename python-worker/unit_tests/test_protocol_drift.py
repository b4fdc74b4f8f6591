"""The worker's typed frames against the one definition, the Rust structs in
worker-protocol: the generated ``io/protocol.py`` is exactly what
``scripts/gen_protocol.py`` writes from the extension's schema today, and every
field of every JSON frame survives Rust → Python's types → Rust's strict decoder.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import typing
from pathlib import Path
from typing import Any

import mlxd_protocol
import pytest

from mlxd_worker.io import frames, protocol

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protocol", ROOT / "scripts" / "gen_protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protocol"] = module
    spec.loader.exec_module(module)
    return module


def test_the_generated_module_is_current() -> None:
    expected = load_generator().generate(mlxd_protocol.frame_schema())
    current = (ROOT / "python-worker" / "mlxd_worker" / "io" / "protocol.py").read_text()
    assert current == expected, "io/protocol.py is stale: run .venv/bin/python scripts/gen_protocol.py"
    assert protocol.PROTOCOL_VERSION == mlxd_protocol.PROTOCOL_VERSION == frames.PROTOCOL_VERSION


def check(value: Any, tp: Any, at: str, seen: set[str]) -> None:
    """Fails unless ``value`` has type ``tp``; a typed dict must carry every key it
    declares (the examples set every field), and no other."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return
    if origin is typing.Union:
        errors = []
        for alt in args:
            try:
                check(value, alt, at, seen)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{at}: {value!r} fits none of {args}: {errors}")
    if origin is typing.Literal:
        assert value in args, f"{at}: {value!r} not in {args}"
    elif origin is list:
        assert isinstance(value, list), f"{at}: not a list"
        for i, v in enumerate(value):
            check(v, args[0], f"{at}[{i}]", seen)
    elif origin is dict:
        assert isinstance(value, dict), f"{at}: not an object"
    elif tp is type(None):
        assert value is None, f"{at}: {value!r} is not null"
    elif tp is bool:
        assert isinstance(value, bool), f"{at}: {value!r} is not a bool"
    elif tp is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{at}: {value!r} is not an int"
    elif tp is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{at}: {value!r} is not a number"
    elif tp is str:
        assert isinstance(value, str), f"{at}: {value!r} is not a str"
    elif typing.is_typeddict(tp):
        assert isinstance(value, dict), f"{at}: not an object"
        hints = typing.get_type_hints(tp)
        assert set(value) == set(hints), f"{at} ({tp.__name__}): keys {sorted(value)} != declared {sorted(hints)}"
        seen.add(tp.__name__)
        for key, v in value.items():
            check(v, hints[key], f"{at}.{key}", seen)
    else:
        raise AssertionError(f"{at}: no check for {tp!r}")


def examples() -> list[tuple[str, int, dict[str, Any]]]:
    """Each example's JSON (a Generate's image files, after it, are checked apart)."""
    names = {value: name for name, value in mlxd_protocol.frame_kinds()}
    return [
        (names[kind], kind, json.loads(payload.split(b"\0")[0])) for kind, payload in mlxd_protocol.frame_examples()
    ]


def test_a_generates_image_files_travel_as_bytes_after_its_json() -> None:
    (payload,) = [p for kind, p in mlxd_protocol.frame_examples() if kind == frames.GENERATE]
    req, images = frames.decode_generate(payload)
    assert images == [b"\x89PNG\r\n\x1a\n"] and req["id"]
    assert frames.decode_generate(frames.json_payload(req)) == (req, [])
    assert mlxd_protocol.decode_strict(frames.GENERATE, payload) == payload
    with pytest.raises(ValueError, match="truncated"):
        frames.decode_generate(payload[:-1])


def test_every_json_frame_kind_has_a_type_and_an_example() -> None:
    kinds = {name for name, _, _ in examples()}
    assert kinds == set(protocol.FRAME_TYPES)
    assert kinds >= {"HELLO", "LOAD", "READY", "GENERATE", "DONE", "ERROR", "STATS", "TOOL_CALL", "LOGPROBS"}


@pytest.mark.parametrize("name,kind,example", examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_round_trips_through_both_sides(name: str, kind: int, example: dict[str, Any]) -> None:
    seen: set[str] = set()
    check(example, protocol.FRAME_TYPES[name], name, seen)
    # Python encodes what it decoded; Rust decodes it strictly and finds the same frame.
    again = mlxd_protocol.decode_strict(kind, frames.json_payload(example))
    assert json.loads(again) == example


def test_all_typed_dicts_are_exercised() -> None:
    seen: set[str] = set()
    for name, _, example in examples():
        check(example, protocol.FRAME_TYPES[name], name, seen)
    declared = {n for n, v in vars(protocol).items() if typing.is_typeddict(v) and not n.startswith("_")}
    # Variants of a tagged enum appear one at a time (the example takes one).
    unexercised = declared - seen
    assert unexercised <= {"OutputFormatJsonObject", "FlushOptionsStep", "FlushOptionsMs"}, unexercised


@pytest.mark.parametrize("name,kind,example", examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_misspelt_field_is_refused(name: str, kind: int, example: dict[str, Any]) -> None:
    first = next(iter(example))
    misspelt = {(k + "_" if k == first else k): v for k, v in example.items()}
    with pytest.raises(ValueError, match=first + "_"):
        mlxd_protocol.decode_strict(kind, frames.json_payload(misspelt))
