"""One real daemon for the pytest session: real workers, real SmolLM2-135M."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import anthropic
import httpx
import ollama
import pytest
import vision_model
from agent_model import CLAUDE_CODE_CALL, CODEX_CALL, agent_dir
from families import (
    DISK,
    DRAFT,
    DRAFT_POLICY,
    DRAFTED,
    FAMILIES,
    KV8,
    KV8_GROUP,
    KV8_REFUSED,
    MAX_KV_SIZE,
    ROTATING,
    family_dir,
)
from openai import OpenAI
from scripted import plain_dir
from thinking import thinker_dir

ROOT = Path(__file__).resolve().parents[2]
# The daemon under test: scripts/test's build (MLXD_BIN), else the release build.
MLXD = Path(os.environ.get("MLXD_BIN") or ROOT / "target" / "release" / "mlxd")


def _worker_test_module(name: str) -> ModuleType:
    """A helper module of the worker's own tests (python-worker/unit_tests), by its
    path: that directory on sys.path would shadow this conftest with its own."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "python-worker" / "unit_tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The numpy BERT and the tiny cross-encoder the worker's own tests use.
bert_reference = sys.modules.get("bert_reference") or _worker_test_module("bert_reference")
# The tiny Qwen3 in Qwen3-Embedding's layout and its mlx-lm reference vectors.
decoder_embedder = sys.modules.get("decoder_embedder") or _worker_test_module("decoder_embedder")


def control(timeout: float = 600) -> httpx.Client:
    """The daemon's control socket, where the admin routes are."""
    transport = httpx.HTTPTransport(uds=os.environ["MLXD_TEST_CONTROL_SOCKET"])
    return httpx.Client(transport=transport, base_url="http://localhost", timeout=timeout)


def models_dir() -> Path:
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    return Path(os.environ.get("MLXD_MODELS_DIR") or home / "models")


def other_vocab_draft(at: Path) -> Path:
    """The 4-bit test model with one token added to its tokenizer: a draft whose
    vocabulary is not the target's."""
    draft = at / "smollm2-135m-q4-othervocab"
    shutil.copytree(models_dir() / "smollm2-135m-q4", draft)
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    extra = dict(tokenizer["added_tokens"][-1])
    extra.update(id=len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]), content="<|mlxd_extra|>")
    tokenizer["added_tokens"].append(extra)
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    return draft


@contextmanager
def _builds_under_target() -> Iterator[None]:
    """One process at a time builds the test models kept under target/."""
    lock = ROOT / "target" / ".e2e-models.lock"
    lock.parent.mkdir(exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def session_presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Presets made at run time: a target whose draft has another vocabulary,
    served without drafting, and the same with require_supported."""
    at = tmp_path_factory.mktemp("mlxd")
    # pytest-xdist runs modules in two processes, each making these presets: the
    # models they build under target/ are built by one at a time (the other then
    # finds them built and current).
    with _builds_under_target():
        draft = other_vocab_draft(at)
        presets = at / "presets"
        presets.mkdir()
        for name, required in [
            ("smollm2-135m-spec-othervocab", False),
            ("smollm2-135m-spec-othervocab-required", True),
        ]:
            (presets / f"{name}.toml").write_text(
                f'model = "smollm2-135m"\n[speculative]\ndraft = "{draft}"\nmode = "on"\n'
                f"require_supported = {str(required).lower()}\n"
            )
        # The prefix cache spilling to a directory of this session (test_prompt_cache).
        (presets / "smollm2-135m-disk.toml").write_text(
            f'model = "smollm2-135m"\n[performance]\nprompt_cache_dir = "{at / "prompt-cache"}"\n'
        )
        # A worker taken for hung after 2 quiet seconds (test_huge_requests).
        (presets / "smollm2-135m-quick-hang.toml").write_text('model = "smollm2-135m"\nhang_timeout = "2s"\n')
        # One tiny random-weight model per mlx-lm family (test_families), built once
        # under target/families.
        for family in FAMILIES:
            (presets / f"family-{family}.toml").write_text(
                f'model = "{family_dir(family)}"\nkeep_alive = "30s"\n[performance]\nmax_concurrent = 4\n'
            )
        # Issue 33: DeepSeek-V3's layers split into a two-rank pipeline (test_distributed).
        (presets / "family-deepseek_v3-pp2.toml").write_text(
            f'model = "{family_dir("deepseek_v3")}"\nkeep_alive = "30s"\nmax_concurrent = 4\n'
            '[distributed]\nhosts = ["self", "self"]\nparallel = "pipeline"\n'
        )
        # A disagreeing draft (another family, the same tokenizer): self-drafting
        # accepts everything and would hide a rewind that keeps rejected tokens.
        drafted = [(f"family-{f}-drafted", f, "on") for f in DRAFTED]
        for name, family, mode in drafted + [(f"family-{f}-draft-{m}", f, m) for f, m in DRAFT_POLICY]:
            (presets / f"{name}.toml").write_text(
                f'model = "{family_dir(family)}"\nkeep_alive = "30s"\n'
                f'[speculative]\ndraft = "{family_dir(DRAFT)}"\nmode = "{mode}"\nnum_draft_tokens = 3\n'
            )
        # The disk tier of the prefix cache, found again by the next worker.
        for family in DISK:
            (presets / f"family-{family}-disk.toml").write_text(
                f'model = "{family_dir(family)}"\n[performance]\nprompt_cache_dir = "{at / "family-cache" / family}"\n'
            )
        for family in KV8_REFUSED:
            (presets / f"family-{family}-kv8.toml").write_text(
                f'model = "{family_dir(family)}"\n[performance]\nkv_bits = 8\nkv_group_size = 32\n'
            )
        # kv_bits 8 where the family takes it (wider heads: mx.quantize groups of 32).
        for family in KV8:
            (presets / f"family-{family}-kv8q.toml").write_text(
                f'model = "{family_dir(family, wide=True)}"\nkeep_alive = "30s"\n'
                f"[performance]\nmax_concurrent = 4\nkv_bits = 8\nkv_group_size = {KV8_GROUP}\n"
            )
        for family in ROTATING:
            (presets / f"family-{family}-rotating.toml").write_text(
                f'model = "{family_dir(family)}"\nkeep_alive = "30s"\n'
                f"[performance]\nmax_concurrent = 4\nmax_kv_size = {MAX_KV_SIZE}\n"
            )
        # A reasoning model whose thinking and answer are known (test_reasoning), and
        # the same with reasoning = "off".
        (presets / "thinker.toml").write_text(f'model = "{thinker_dir()}"\nkeep_alive = "60s"\n')
        (presets / "thinker-inline.toml").write_text(
            f'model = "{thinker_dir()}"\nkeep_alive = "30s"\nreasoning = "off"\n'
        )
        # A model whose generation_config.json asks for sampling (test_sampling_defaults).
        # Its scripted token is barely likelier than any other (logit 2 against 0).
        hot = plain_dir("hot", {"do_sample": True, "temperature": 1.5, "top_p": 1.0}, logit=2.0)
        (presets / "scripted-hot.toml").write_text(f'model = "{hot}"\nkeep_alive = "30s"\n')
        plain = plain_dir("plain", logit=2.0)
        (presets / "scripted-plain.toml").write_text(f'model = "{plain}"\nkeep_alive = "30s"\n')
        # A tiny random cross-encoder (test_embeddings' rerank).
        reranker = bert_reference.write_tiny_cross_encoder(at / "tiny-reranker", models_dir() / "all-minilm-l6-v2")
        (presets / "tiny-reranker.toml").write_text(f'model = "{reranker}"\nkeep_alive = "30s"\n')
        # A tiny vision-language model (test_vision): served by the vision engine
        # because its config has a vision tower.
        vlm = vision_model.build(ROOT / "target" / "families" / "qwen2_vl", models_dir() / "smollm2-135m")
        (presets / "tiny-vlm.toml").write_text(f'model = "{vlm}"\nkeep_alive = "60s"\n')
        # The same as Gemma 3 (test_vision): a template that writes the BOS itself,
        # sliding-window layers, a SigLIP tower.
        gemma3_vlm = vision_model.build_gemma3(
            ROOT / "target" / "families" / "gemma3_vlm", models_dir() / "smollm2-135m"
        )
        (presets / "tiny-gemma3-vlm.toml").write_text(f'model = "{gemma3_vlm}"\nkeep_alive = "60s"\n')
        # A decoder embedding model, known as one by its sentence-transformers files.
        qwen3_embedding = decoder_embedder.write(at / "tiny-qwen3-embedding", models_dir() / "smollm2-135m")
        (presets / "tiny-qwen3-embedding.toml").write_text(f'model = "{qwen3_embedding}"\nkeep_alive = "30s"\n')
        # A tiny hybrid chat model (linear and full attention, SmolLM2's tokenizer) as a
        # reranker by the yes/no method (test_embeddings).
        (presets / "tiny-chat-rerank.toml").write_text(
            f'model = "{family_dir("qwen3_next")}"\nkeep_alive = "30s"\n[rerank]\nmethod = "yes_no"\n'
            'instruction = "Find the passage that answers the question"\n'
        )
        # Tool-calling models for the agent CLIs (test_agent_clis): the first turn
        # calls the CLI's own tool, the next answers.
        for name, call in [("agent-claude-code", CLAUDE_CODE_CALL), ("agent-codex", CODEX_CALL)]:
            (presets / f"{name}.toml").write_text(f'model = "{agent_dir(*call)}"\nkeep_alive = "30s"\n')
    return presets


@pytest.fixture(scope="session")
def daemon_url(session_presets: Path) -> Iterator[str]:
    binary = MLXD
    assert binary.exists(), f"build {binary} first: scripts/test does"
    proc = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--port",
            "0",
            "--presets-dir",
            str(ROOT / "tests" / "presets"),
            "--presets-dir",
            str(session_presets),
            "--exit-on-stdin-eof",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # test_vision.py serves images on loopback: listed exactly, so allowed.
        env={**os.environ, "MLXD_LOG": "warn", "MLXD_ALLOWED_IMAGE_HOSTS": "127.0.0.1"},
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("mlxd listening on "), line
    url = line.removeprefix("mlxd listening on ")
    port = int(url.rsplit(":", 1)[1])
    home = Path(os.environ.get("MLXD_HOME") or Path.home() / ".mlxd")
    os.environ["MLXD_TEST_CONTROL_SOCKET"] = str(home / f"mlxd-{port}.sock")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


# The official clients, pointed at the session's daemon (no retries: a failure
# shows as it happened).
@pytest.fixture(scope="session")
def oai(daemon_url: str) -> OpenAI:
    return OpenAI(base_url=f"{daemon_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def claude(daemon_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def olla(daemon_url: str) -> ollama.Client:
    return ollama.Client(host=daemon_url)
