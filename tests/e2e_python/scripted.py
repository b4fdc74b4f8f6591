"""Tiny models whose greedy output is known: real mlx-lm inference, scripted.

The model is mlx-lm's own Llama class, one layer, whose weights make the next
token a function of the current one: the attention and MLP outputs are zero, so
the last position's hidden state is its token's embedding; each scripted token's
embedding is its own basis vector, and the output layer maps that vector to its
successor. Greedy decoding then follows the successor chain from the prompt's last
token, whatever came before it, and after a token the worker forced it goes on
from there, as a real model would. A chat template that ends its generation prompt
with different tokens in different situations picks the chain.

The tokenizer is SmolLM2's with the script's own tokens added. The prompt costs
almost nothing to prefill (64-wide, one layer), so a long context
(`max_position_embeddings`) holds the prompts agent CLIs send.

No tests live here; tests import this module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from families import TOKENIZER_FILES, tokenizer_dir
from mlx.utils import tree_flatten

# SmolLM2's vocabulary; added tokens take the ids from here on.
BASE_VOCAB = 49152
NEWLINE, BLANK_LINE, EOS = 198, 1116, 2  # "\n", "\n\n", <|im_end|>
HIDDEN = 64


def build(
    out: Path,
    *,
    successors: dict[int, int],
    added: dict[int, str],
    chat_template: str,
    max_position_embeddings: int = 4096,
    generation_config: dict[str, Any] | None = None,
    logit: float = 80.0,
) -> Path:
    """The model in `out` (built once per script; config.json is written last).

    `successors` maps each scripted token to the one greedy decoding writes after
    it; `added` are tokens added to SmolLM2's tokenizer (id: text);
    `generation_config` is written as the model's generation_config.json; `logit`
    is the scripted successor's logit (every other token's is 0): the default
    makes sampling at any temperature write the script too."""
    # What the build was made from: a changed script rebuilds the directory.
    key = json.dumps(
        [
            sorted(successors.items()),
            sorted(added.items()),
            chat_template,
            max_position_embeddings,
            generation_config,
            logit,
        ]
    )
    if (out / "config.json").is_file() and (out / "scripted.json").is_file():
        if (out / "scripted.json").read_text() == key:
            return out
    shutil.rmtree(out, ignore_errors=True)
    from mlx_lm.models.llama import Model, ModelArgs

    assert len(successors) <= HIDDEN, "one basis vector per scripted token"
    assert all(i >= BASE_VOCAB for i in added), "added tokens come after SmolLM2's"
    config: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": max([BASE_VOCAB - 1, *added]) + 1,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": EOS,
    }
    out.mkdir(parents=True, exist_ok=True)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    vocab = config["vocab_size"]
    embed = mx.zeros((vocab, HIDDEN))
    head = mx.zeros((vocab, HIDDEN))
    for i, (token, successor) in enumerate(successors.items()):
        embed[token, i] = 1.0
        # The final norm scales a one-hot hidden state to sqrt(HIDDEN).
        head[successor, i] = logit / HIDDEN**0.5
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
    for token_id, content in sorted(added.items()):
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
    (out / "chat_template.jinja").write_text(chat_template)
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    (out / "scripted.json").write_text(key)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _silenced(name: str) -> bool:
    """The layer's output projections: zero, so the residual stream is the embedding."""
    return name.endswith(("o_proj.weight", "down_proj.weight"))


def chain(*tokens: int) -> dict[int, int]:
    """Successors that write `tokens` in order (each token once: one successor each)."""
    assert len(set(tokens)) == len(tokens), f"a token repeats in {tokens}"
    return dict(zip(tokens, tokens[1:]))


# A plain chat model: after ChatML's generation prompt it answers PLAIN_ANSWER.
PLAIN_ANSWER = "The answer is four"
PLAIN_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def plain_dir(name: str, generation_config: dict[str, Any] | None = None, logit: float = 80.0) -> Path:
    """A model that answers PLAIN_ANSWER greedily, with this generation_config.json."""
    root = Path(__file__).resolve().parents[2]
    return build(
        root / "target" / "scripted" / name,
        successors=chain(NEWLINE, 504, 2988, 314, 1876, EOS),
        added={},
        chat_template=PLAIN_TEMPLATE,
        generation_config=generation_config,
        logit=logit,
    )
