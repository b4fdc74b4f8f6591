"""Decoder embedding models (models/embedder.py's decoder path): a tiny random Qwen3
in Qwen3-Embedding's layout gives mlx-lm's own backbone's last-token vectors,
batched with padding; what it cannot serve fails the load with the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import decoder_embedder
import numpy as np
import pytest

from mlxd_worker.errors import UnservableModel
from mlxd_worker.models import embedder

SMOLLM2 = Path(os.environ.get("MLXD_MODELS_DIR", Path.home() / ".mlxd" / "models")) / "smollm2-135m"
TEXTS = [
    "A man is eating food.",
    "The girl is carrying a baby on her back across the wide river at dawn.",
    "Stocks fell.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decoder_embedder.write(tmp_path_factory.mktemp("qwen3-embedding"), SMOLLM2)


def test_vectors_are_the_backbones_last_token_state_batched_or_not(model_dir: Path) -> None:
    model = embedder.load(model_dir)
    assert (model.pooling, model.dims, model.family) == (embedder.Pooling("lasttoken", True), 64, "qwen3")
    rows = [model.tokenize(t) for t in TEXTS]
    got = np.array(model.embed(rows))  # one batch: the shorter rows are right-padded
    for row, vector in zip(rows, got):
        want = decoder_embedder.vector(model_dir, row)
        assert float(vector @ want) >= 0.9999
        assert np.allclose(vector, want, atol=1e-4)
    alone = np.array(model.embed([rows[2]]))[0]
    assert float(alone @ got[2]) >= 0.99999


def test_the_query_prompt_goes_before_a_query_only(model_dir: Path) -> None:
    model = embedder.load(model_dir)
    assert model.prompted("capital of France?", "query") == decoder_embedder.QUERY_PROMPT + "capital of France?"
    assert model.prompted("Paris is the capital.", "document") == "Paris is the capital."
    assert model.prompted("plain text") == "plain text"


def test_a_chat_checkpoint_named_as_embedder_pools_its_last_token(tmp_path: Path) -> None:
    """Prefixed keys with an LM head and no sentence-transformers files: the preset's
    `engine = "embedding"` path; the head is left unloaded."""
    directory = decoder_embedder.write(tmp_path / "chat", SMOLLM2, layout="mlx-lm")
    model = embedder.load(directory)
    assert model.pooling == embedder.Pooling("lasttoken", True)
    row = model.tokenize(TEXTS[0])
    assert float(np.array(model.embed([row]))[0] @ decoder_embedder.vector(directory, row)) >= 0.9999


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"config": {"use_bidirectional_attention": True}}, "bidirectional"),
        ({"config": {"model_type": "no_such_family"}}, "no_such_family"),
        ({"module": "sentence_transformers.models.Dense"}, "'Dense' is not implemented"),
        ({"pooling": {"pooling_mode_mean_tokens": True, "include_prompt": False}}, "without the prompt"),
    ],
)
def test_what_it_cannot_serve_fails_the_load_with_the_reason(
    model_dir: Path, tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    import shutil

    directory = Path(shutil.copytree(model_dir, tmp_path / "m"))
    if "config" in change:
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **change["config"]}))  # type: ignore[dict-item]
    if "module" in change:
        modules = json.loads((directory / "modules.json").read_text())
        modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": change["module"]})
        (directory / "modules.json").write_text(json.dumps(modules))
    if "pooling" in change:
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(change["pooling"]))
    with pytest.raises(UnservableModel, match=reason):
        embedder.load(directory)


def test_an_end_token_the_tokenizer_config_asks_for_is_pooled_at(model_dir: Path, tmp_path: Path) -> None:
    """`add_eos_token` (gte-Qwen2: its tokenizer's own code adds it): each text ends
    with the end token, the token the vector is read at, even for token-id inputs."""
    import shutil

    directory = Path(shutil.copytree(model_dir, tmp_path / "m"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "add_eos_token": True}))
    model = embedder.load(directory)
    eos = model.tokenizer.eos_token_id
    row = model.tokenize(TEXTS[0])
    bare = list(model.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"])
    assert row[-1] == eos and row[:-1][-len(bare) :] == bare
    assert model.with_special_tokens(bare)[-1] == eos
    assert float(np.array(model.embed([row]))[0] @ decoder_embedder.vector(directory, row)) >= 0.9999
