"""The draft policy, driven with made-up rounds and timings (no model)."""

from __future__ import annotations

from types import SimpleNamespace

from mlxd_worker.lanes.drafting import FIRST_PROBE_INTERVAL, DraftController
from mlxd_worker.lanes.speculative import is_mixture_of_experts, tokenizer_mismatch


def rounds(c: DraftController, n: int, drafted: int, accepted: int, tps: float, now: float = 0.0) -> None:
    for _ in range(n):
        tokens = accepted + 1
        c.on_round(drafted, accepted, tokens, tokens / tps, now)


def test_low_acceptance_lowers_the_draft_length_then_high_raises_it() -> None:
    c = DraftController(draft="d", mode="auto", max_draft=4)
    rounds(c, 8, drafted=4, accepted=1, tps=20)  # 0.25: below LOWER_BELOW, not below OFF_BELOW
    assert c.active and c.num_draft == 3 and c.transitions["lowered"] == 1
    assert c.status()["num_draft_tokens"] == 3
    rounds(c, 10, drafted=3, accepted=3, tps=30)
    assert c.num_draft == 4 and c.transitions["raised"] == 1


def test_collapsed_acceptance_stops_drafting_and_probes_later() -> None:
    c = DraftController(draft="d", mode="auto", max_draft=3)
    rounds(c, 10, drafted=3, accepted=0, tps=20, now=100.0)
    assert not c.active and c.transitions["off"] == 1
    assert "acceptance 0.00" in c.reason and "probing again" in c.reason
    assert c.status()["num_draft_tokens"] == 0
    assert not c.use_draft(None, 100.0 + FIRST_PROBE_INTERVAL - 1)
    assert c.use_draft(None, 100.0 + FIRST_PROBE_INTERVAL)  # the probe
    assert c.transitions["on"] == 1 and c.num_draft == 3
    # The probe loses again: the next wait is twice as long.
    rounds(c, 10, drafted=3, accepted=0, tps=20, now=200.0)
    assert not c.active and c.probe_at == 200.0 + 2 * FIRST_PROBE_INTERVAL


def test_drafting_slower_than_plain_decoding_turns_it_off() -> None:
    c = DraftController(draft="d", mode="auto", max_draft=3)
    c.on_plain(16, 16 / 7.0, 0.0)  # 7 tok/s plain
    rounds(c, 4, drafted=3, accepted=3, tps=4.3)  # all accepted, yet slower
    assert not c.active
    assert "drafting measured slower: 4.3 tok/s against 7.0 plain" in c.reason


def test_drafting_faster_than_plain_stays_on() -> None:
    c = DraftController(draft="d", mode="auto", max_draft=3)
    c.on_plain(16, 16 / 7.0, 0.0)
    rounds(c, 10, drafted=3, accepted=2, tps=12.0)
    assert c.active and c.transitions["off"] == 0


def test_mode_on_never_adapts_and_off_never_drafts() -> None:
    on = DraftController(draft="d", mode="on", max_draft=3)
    on.on_plain(16, 1.0, 0.0)
    rounds(on, 20, drafted=3, accepted=0, tps=1.0)
    assert on.active and on.num_draft == 3 and on.use_draft(None, 0.0)
    off = DraftController(draft="d", mode="off", max_draft=3)
    assert not off.use_draft(None, 1e9) and off.reason.startswith('mode = "off"')
    assert not off.available and not off.use_draft(True, 0.0)  # no draft loaded to force


def test_an_unsupported_pair_never_drafts_even_when_forced() -> None:
    c = DraftController(draft="d", mode="on", max_draft=3, unsupported="vocabularies differ")
    assert not c.available and not c.active and c.reason == "vocabularies differ"
    assert not c.use_draft(True, 0.0)


def test_counters_start_after_the_warm_up() -> None:
    c = DraftController(draft="d", mode="on", max_draft=3)
    rounds(c, 2, drafted=3, accepted=1, tps=10)  # warm-up: measured, not counted
    c.switched("batch")
    assert c.status()["drafted_total"] == 0 and c.status()["to_batch_total"] == 0
    c.start_counting()
    assert c.acceptance == 0.0
    rounds(c, 2, drafted=3, accepted=2, tps=10)
    c.switched("batch")
    s = c.status()
    assert (s["drafted_total"], s["accepted_total"], s["acceptance"]) == (6, 4, round(4 / 6, 4))
    assert s["to_batch_total"] == 1


def tok(vocab: dict[str, int], eos: list[int], bos: int | None = 1) -> SimpleNamespace:
    return SimpleNamespace(get_vocab=lambda: vocab, eos_token_ids=eos, bos_token_id=bos, all_special_tokens=["<s>"])


def test_tokenizers_must_match_in_vocabulary_and_special_tokens() -> None:
    base = {"<s>": 1, "</s>": 2, "a": 3}
    assert tokenizer_mismatch(tok(base, [2]), tok(dict(base), [2])) is None
    vocab = tokenizer_mismatch(tok(base, [2]), tok({**base, "b": 4}, [2]))
    assert vocab is not None and "vocabulary differs" in vocab and "4 vs 3 tokens" in vocab
    eos = tokenizer_mismatch(tok(base, [2]), tok(base, [1]))
    assert eos is not None and "EOS tokens" in eos
    bos = tokenizer_mismatch(tok(base, [2]), tok(base, [2], bos=3))
    assert bos is not None and "BOS token" in bos


def test_mixture_of_experts_configs_are_recognised() -> None:
    assert is_mixture_of_experts({"model_type": "qwen3_moe"})
    assert is_mixture_of_experts({"model_type": "mixtral"})
    assert is_mixture_of_experts({"model_type": "x", "num_local_experts": 8})
    assert is_mixture_of_experts({"text_config": {"n_routed_experts": 64}})
    assert not is_mixture_of_experts({"model_type": "llama", "num_hidden_layers": 30})
