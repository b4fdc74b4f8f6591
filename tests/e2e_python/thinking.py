"""A tiny reasoning model whose answer is known: real mlx-lm inference, scripted.

The model is mlx-lm's own Llama class, one layer, whose weights make the next
token a function of the current one: the attention and MLP outputs are zero, so
the last position's hidden state is its token's embedding; each scripted token's
embedding is its own basis vector, and the output layer maps that vector to the
token that follows it in SCRIPT. Greedy decoding then writes SCRIPT whatever came
before, and after a token the worker forced (`</think>` at the end of a thinking
budget) it goes on from there, as a real model would.

The tokenizer is SmolLM2's with `<think>` and `</think>` added, and a chat template
that opens the thinking section in the prompt (as Qwen3's thinking models do) or,
with ``enable_thinking=False``, writes an empty one.

No tests live here; tests import this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from families import TOKENIZER_FILES, tokenizer_dir
from mlx.utils import tree_flatten

THINK, END_THINK = "<think>", "</think>"
THINK_ID, END_THINK_ID = 49152, 49153
NEWLINE, BLANK_LINE, EOS = 198, 1116, 2  # "\n", "\n\n", <|im_end|>

# What the model writes after the prompt "...<think>\n": its thinking, the end
# of it, the answer, EOS. Each token once, so that each has one successor.
THINKING = "Let me think."
ANSWER = "The answer is four"
SCRIPT = [NEWLINE, 4239, 549, 1510, 30, END_THINK_ID, 504, 2988, 314, 1876, EOS]
# After an empty thinking section ("</think>\n\n"), the answer right away.
SUCCESSORS = {a: b for a, b in zip(SCRIPT, SCRIPT[1:])} | {BLANK_LINE: 504}
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

CONFIG = {
    "model_type": "llama",
    "vocab_size": 49154,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": EOS,
}


def build(out: Path) -> Path:
    """The model in `out` (built once; config.json is written last)."""
    if (out / "config.json").is_file():
        return out
    from mlx_lm.models.llama import Model, ModelArgs

    out.mkdir(parents=True, exist_ok=True)
    model = Model(ModelArgs.from_dict(CONFIG))
    weights = dict(tree_flatten(model.parameters()))
    hidden, vocab = CONFIG["hidden_size"], CONFIG["vocab_size"]
    embed = mx.zeros((vocab, hidden))
    head = mx.zeros((vocab, hidden))
    for i, (token, successor) in enumerate(SUCCESSORS.items()):
        embed[token, i] = 1.0
        head[successor, i] = 10.0
    weights = {name: mx.zeros_like(w) if _silenced(name) else w for name, w in weights.items()}
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    src = tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and name != "chat_template.jinja":
            shutil.copyfile(src / name, out / name)
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    for token_id, content in ((THINK_ID, THINK), (END_THINK_ID, END_THINK)):
        tokenizer["added_tokens"].append(
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tok_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tok_config))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "config.json").write_text(json.dumps(CONFIG))
    return out


def _silenced(name: str) -> bool:
    """The layer's output projections: zero, so the residual stream is the embedding."""
    return name.endswith(("o_proj.weight", "down_proj.weight"))


def thinker_dir() -> Path:
    root = Path(__file__).resolve().parents[2]
    return build(root / "target" / "thinking" / "think")
