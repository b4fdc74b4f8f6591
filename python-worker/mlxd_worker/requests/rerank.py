"""A chat model as reranker, by the yes/no method of Qwen3-Reranker: each document
becomes a conversation that asks whether it meets the query under the preset's
instruction, and its relevance is the model's probability of answering "yes"
rather than "no" at the first token of its answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import RequestError

# Qwen3-Reranker's system message.
JUDGE = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


@dataclass
class RerankPlan:
    """A rerank as the reader thread hands it to the engine: one prompt per document."""

    rid: int
    prompts: list[list[int]]


def judge_messages(instruction: str, query: str, document: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE},
        {"role": "user", "content": f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"},
    ]


def judge_prompt(tokenizer: Any, instruction: str, query: str, document: str) -> list[int]:
    """The conversation's tokens up to the answer (thinking off: the answer is the verdict)."""
    from .plan import template_ids

    return template_ids(
        tokenizer.apply_chat_template(
            judge_messages(instruction, query, document),
            add_generation_prompt=True,
            tokenize=True,
            enable_thinking=False,
        )
    )


def verdict_tokens(tokenizer: Any) -> tuple[int, int]:
    """The tokens of "yes" and of "no"; RequestError when the tokenizer has no
    single, distinct token for each (the method compares the two)."""
    yes = tokenizer.encode("yes", add_special_tokens=False)
    no = tokenizer.encode("no", add_special_tokens=False)
    if len(yes) != 1 or len(no) != 1 or yes == no:
        raise RequestError(f'this model\'s tokenizer spells "yes" as {yes} and "no" as {no}: not one token each')
    return int(yes[0]), int(no[0])
