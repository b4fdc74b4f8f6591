"""A tiny tool-calling model for the agent CLIs' end-to-end tests (scripted.py).

Its chat template is Qwen's shape in miniature (mlx-lm reads `<tool_call>` JSON
from it: the json_tools parser), and its generation prompt ends in "\\n" on a
fresh request and in "\\n\\n" once the conversation holds a tool result. So the
model's first turn is the one tool call CALL, and its turn after the tool's result
is ANSWER: the request and response sequence of a real agent turn, with the
client's real prompts (~12k tokens for Claude Code) prefilled in a second or two.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import scripted
from scripted import BASE_VOCAB, BLANK_LINE, EOS, NEWLINE

CALL_OPEN, CALL_CLOSE, CALL_BODY, ANSWER_ID = range(BASE_VOCAB, BASE_VOCAB + 4)
ANSWER = "The notes were read."

ROOT = Path(__file__).resolve().parents[2]
# Where the CLIs run, and the file their tool call reads.
WORK_DIR = ROOT / "target" / "agent-cli-work"
NOTES = "notes.txt"
# Each CLI's own tool: Claude Code's Read (allowed without asking: it reads in the
# working directory) and Codex's exec_command.
CLAUDE_CODE_CALL: tuple[str, dict[str, object]] = ("Read", {"file_path": str(WORK_DIR / NOTES)})
CODEX_CALL: tuple[str, dict[str, object]] = ("exec_command", {"cmd": f"cat {NOTES}"})

CHAT_TEMPLATE = """\
{%- set ns = namespace(tool_result=false) -%}
{%- if tools %}<|im_start|>system
# Tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'tool' %}{% set ns.tool_result = true %}<|im_start|>tool
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content or '' }}
{%- for tool_call in m.tool_calls or [] %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if ns.tool_result %}{{ '\n' }}{% endif %}{% endif %}"""


def agent_dir(name: str, arguments: dict[str, object]) -> Path:
    """The model whose first turn calls tool `name` with `arguments` (built once per call)."""
    body = "\n" + json.dumps({"name": name, "arguments": arguments}) + "\n"
    key = hashlib.sha256(body.encode()).hexdigest()[:12]
    return scripted.build(
        ROOT / "target" / "agent-model" / f"{name}-{key}",
        successors={
            NEWLINE: CALL_OPEN,
            CALL_OPEN: CALL_BODY,
            CALL_BODY: CALL_CLOSE,
            CALL_CLOSE: EOS,
            BLANK_LINE: ANSWER_ID,
            ANSWER_ID: EOS,
        },
        added={CALL_OPEN: "<tool_call>", CALL_CLOSE: "</tool_call>", CALL_BODY: body, ANSWER_ID: ANSWER},
        chat_template=CHAT_TEMPLATE,
        max_position_embeddings=65536,
    )
