#!/usr/bin/env python3
"""Generates python-worker/mlxd_worker/io/protocol.py, the worker's typed frames,
from the Rust definitions in worker-protocol (their JSON Schema, exported by the
``mlxd_protocol`` extension). The Rust structs are the one definition; this file
only translates them, and ``python-worker/unit_tests/test_protocol_drift.py`` fails when
the committed module differs from what this script writes now.

    .venv/bin/python scripts/gen_protocol.py          # rewrite the module
    .venv/bin/python scripts/gen_protocol.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parent.parent / "python-worker" / "mlxd_worker" / "io" / "protocol.py"

HEADER = '''"""The worker protocol's JSON frames as typed dicts. GENERATED from the Rust
definitions in worker-protocol/src/frame.rs by scripts/gen_protocol.py: do not edit;
change the Rust structs and run the script. The daemon decodes every frame from the
worker strictly (an unknown or misspelt field is an error), and
python-worker/unit_tests/test_protocol_drift.py round-trips every field through both sides.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, TypedDict, Union

'''

Schema = dict[str, Any]


class Generator:
    def __init__(self, schema: Schema) -> None:
        self.defs: dict[str, Schema] = schema["$defs"]
        self.frames: dict[str, Schema] = schema["frames"]
        self.version: int = schema["protocol_version"]
        self.batch_size_bounds: list[int] = schema["batch_size_bounds"]
        self.classes: list[str] = []
        self.aliases: list[str] = []
        self.done: set[str] = set()

    def ref_name(self, schema: Schema) -> str:
        return str(schema["$ref"]).rsplit("/", 1)[-1]

    def type_of(self, schema: Any, hint: str) -> str:
        """The Python type of a property schema (``hint`` names generated variants)."""
        if schema is True or not set(schema) - {"description", "default"}:
            return "Any"  # serde_json::Value: any JSON
        if "$ref" in schema:
            name = self.ref_name(schema)
            self.define(name)
            return name
        if "const" in schema:
            return f"Literal[{json.dumps(schema['const'])}]"
        if "enum" in schema:
            return "Literal[" + ", ".join(json.dumps(v) for v in schema["enum"]) + "]"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                non_null = [a for a in alts if a.get("type") != "null"]
                parts = [self.variant(a, hint, i) for i, a in enumerate(non_null)]
                inner = parts[0] if len(parts) == 1 else "Union[" + ", ".join(parts) + "]"
                return f"Optional[{inner}]" if len(non_null) < len(alts) else inner
        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            inner = self.type_of({**schema, "type": non_null[0]}, hint)
            return f"Optional[{inner}]" if "null" in kind else inner
        if kind == "integer":
            return "int"
        if kind == "number":
            return "float"
        if kind == "boolean":
            return "bool"
        if kind == "string":
            return "str"
        if kind == "array":
            return f"list[{self.type_of(schema.get('items', True), hint)}]"
        if kind == "object" and "properties" in schema:
            self.typed_dict(hint, schema)
            return hint
        if kind == "object":
            return "dict[str, Any]"
        raise ValueError(f"{hint}: no Python type for {schema}")

    def variant(self, schema: Schema, parent: str, index: int) -> str:
        """One alternative of a oneOf: an object variant gets a class of its own,
        named after its tag's value (or its one required key)."""
        if schema.get("type") == "object" and "properties" in schema:
            consts = [p["const"] for p in schema["properties"].values() if isinstance(p, dict) and "const" in p]
            tag = consts[0] if consts else None
            if tag is None:
                tag = schema.get("required", [f"variant{index}"])[0]
            name = parent + "".join(w.capitalize() for w in str(tag).split("_"))
            self.typed_dict(name, schema)
            return name
        return self.type_of(schema, f"{parent}{index}")

    def define(self, name: str) -> None:
        if name in self.done:
            return
        self.done.add(name)
        schema = self.defs[name]
        if "properties" in schema:
            self.typed_dict(name, schema)
        else:
            alias = self.type_of(schema, name)
            self.aliases.append(self.doc_comment(schema) + f"{name} = {alias}\n")

    @staticmethod
    def doc_comment(schema: Schema) -> str:
        text = schema.get("description", "")
        return "".join(f"# {line}\n".replace("# \n", "#\n") for line in text.splitlines())

    def typed_dict(self, name: str, schema: Schema) -> None:
        props: dict[str, Schema] = schema["properties"]
        required = set(schema.get("required", []))
        fields = {k: self.type_of(v, name + "".join(w.capitalize() for w in k.split("_"))) for k, v in props.items()}

        def body(keys: list[str]) -> str:
            lines = []
            for k in keys:
                desc = props[k].get("description", "") if isinstance(props[k], dict) else ""
                for line in desc.splitlines():
                    lines.append(f"    #: {line}".rstrip())
                lines.append(f"    {k}: {fields[k]}")
            return "\n".join(lines) if lines else "    pass"

        doc = schema.get("description", "").strip().replace("\n", "\n    ")
        docstring = f'    """{doc}"""\n\n' if doc else ""
        req = [k for k in props if k in required]
        opt = [k for k in props if k not in required]
        if req and opt:
            self.classes.append(f"class _{name}Required(TypedDict):\n{body(req)}\n")
            self.classes.append(f"class {name}(_{name}Required, total=False):\n{docstring}{body(opt)}\n")
        elif req:
            self.classes.append(f"class {name}(TypedDict):\n{docstring}{body(req)}\n")
        else:
            self.classes.append(f"class {name}(TypedDict, total=False):\n{docstring}{body(opt)}\n")

    def module(self) -> str:
        frame_types = {}
        for kind, schema in sorted(self.frames.items()):
            frame_types[kind] = self.type_of(schema, kind.title().replace("_", ""))
        for name in sorted(self.defs):
            self.define(name)
        out = HEADER + f"PROTOCOL_VERSION = {self.version}\n"
        out += "# StepStats.batch_size_steps: the buckets' upper bounds (and one past them).\n"
        out += f"BATCH_SIZE_BOUNDS = {tuple(self.batch_size_bounds)}\n\n\n"
        out += "\n\n".join(self.classes) + "\n\n"
        out += "\n".join(self.aliases) + "\n"
        out += "# The payload type of each JSON frame kind.\n"
        out += "FRAME_TYPES: dict[str, Any] = {\n"
        out += "".join(f'    "{k}": {v},\n' for k, v in frame_types.items())
        out += "}\n"
        return out


def generate(schema_text: str) -> str:
    return Generator(json.loads(schema_text)).module()


def main() -> int:
    import mlxd_protocol

    text = generate(mlxd_protocol.frame_schema())
    if "--check" in sys.argv[1:]:
        if TARGET.read_text() != text:
            print(f"{TARGET} is stale: run .venv/bin/python scripts/gen_protocol.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
