"""A tiny reasoning model whose answer is known: a scripted model (scripted.py).

After a prompt ending "...<think>\n" it writes SCRIPT: its thinking, the end of
it, the answer, EOS; after a token the worker forced (`</think>` at the end of a
thinking budget) it goes on from there, as a real model would.

The tokenizer is SmolLM2's with `<think>` and `</think>` added, and a chat template
that opens the thinking section in the prompt (as Qwen3's thinking models do) or,
with ``enable_thinking=False``, writes an empty one.

No tests live here; tests import this module.
"""

from __future__ import annotations

from pathlib import Path

import scripted
from scripted import BLANK_LINE, EOS, NEWLINE

THINK, END_THINK = "<think>", "</think>"
THINK_ID, END_THINK_ID = 49152, 49153

# What the model writes after the prompt "...<think>\n": its thinking, the end
# of it, the answer, EOS. Each token once, so that each has one successor.
THINKING = "Let me think."
ANSWER = "The answer is four"
SCRIPT = [NEWLINE, 4239, 549, 1510, 30, END_THINK_ID, 504, 2988, 314, 1876, EOS]
# After an empty thinking section ("</think>\n\n"), the answer right away.
SUCCESSORS = scripted.chain(*SCRIPT) | {BLANK_LINE: 504}
# Tokens of the thinking: its words and the closing marker.
REASONING_TOKENS = 5

CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and m.reasoning_content %}\n<think>\n{{ m.reasoning_content }}\n</think>\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)


def thinker_dir() -> Path:
    root = Path(__file__).resolve().parents[2]
    return scripted.build(
        root / "target" / "thinking" / "think",
        successors=SUCCESSORS,
        added={THINK_ID: THINK, END_THINK_ID: END_THINK},
        chat_template=CHAT_TEMPLATE,
    )
