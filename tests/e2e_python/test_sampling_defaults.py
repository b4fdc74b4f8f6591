"""A request that leaves temperature out gets the model's own sampling defaults
(its generation_config.json, as vLLM reads it), else greedy decoding.

Both models are scripted (scripted.py): greedy decoding writes PLAIN_ANSWER. One
of them ships a generation_config.json asking for temperature 1.5. The scripted
token's logit is 2 against 0 for the 49k others, so greedy decoding writes the
script and sampling almost surely does not (the seed makes each run the same).
"""

from __future__ import annotations

from openai import OpenAI
from scripted import PLAIN_ANSWER

ASK = [{"role": "user", "content": "What is two plus two?"}]


def answer(oai: OpenAI, model: str, **sampling: float) -> str:
    r = oai.chat.completions.create(model=model, messages=ASK, max_tokens=8, seed=7, **sampling)  # type: ignore[arg-type]
    return r.choices[0].message.content or ""


def test_without_a_generation_config_decoding_is_greedy(oai: OpenAI) -> None:
    assert answer(oai, "scripted-plain") == PLAIN_ANSWER


def test_the_models_generation_config_sets_the_default_temperature(oai: OpenAI) -> None:
    assert answer(oai, "scripted-hot") != PLAIN_ANSWER
    # The request's own values win.
    assert answer(oai, "scripted-hot", temperature=0.0) == PLAIN_ANSWER
    assert answer(oai, "scripted-plain", temperature=1.5) != PLAIN_ANSWER
