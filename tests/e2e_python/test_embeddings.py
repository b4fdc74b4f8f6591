"""Embeddings through the daemon with the official clients: all-MiniLM-L6-v2 (the
shipped preset `all-minilm-l6-v2`, installed by scripts/setup) served by a worker in
embedding mode, against the model card's published vector and the worker's own
encoder (itself checked against a numpy BERT in python-worker/unit_tests)."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
import tomllib
from openai import OpenAI

from conftest import control

MODEL = "all-minilm-l6-v2"
EXAMPLE = "This is an example sentence"
# sentence-transformers' own first values for EXAMPLE (the model card).
EXAMPLE_START = [0.0677, 0.0635, 0.0487, 0.0793, 0.0374]
CLOSE = ["A man is eating food.", "A man is eating a piece of bread."]
FAR = "Stock markets fell sharply after the central bank raised interest rates."


def test_openai_embeddings_are_the_models_vectors(oai: OpenAI) -> None:
    resp = oai.embeddings.create(model=MODEL, input=[EXAMPLE, *CLOSE, FAR])
    assert resp.model == MODEL and [d.index for d in resp.data] == [0, 1, 2, 3]
    v = np.array([d.embedding for d in resp.data])
    assert v.shape == (4, 384)
    assert np.allclose(v[0, :5], EXAMPLE_START, atol=1e-4)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    sim = v @ v.T
    assert sim[1, 2] > sim[1, 3] + 0.3  # close sentences above an unrelated one
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > 4


def test_base64_token_ids_and_dimensions(oai: OpenAI, daemon_url: str) -> None:
    floats = np.array(oai.embeddings.create(model=MODEL, input=EXAMPLE).data[0].embedding)
    # The openai client asks for base64 by itself and decodes it: read the raw form too.
    raw = httpx.post(
        f"{daemon_url}/v1/embeddings", json={"model": MODEL, "input": EXAMPLE, "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats, atol=1e-6)
    # The same text as token ids (BERT's own, without [CLS]/[SEP]: the worker frames them).
    ids = [2023, 2003, 2019, 2742, 6251]
    by_ids = np.array(oai.embeddings.create(model=MODEL, input=[ids]).data[0].embedding)
    assert float(by_ids @ floats) > 0.9999
    short = np.array(oai.embeddings.create(model=MODEL, input=EXAMPLE, dimensions=32).data[0].embedding)
    assert short.shape == (32,) and np.allclose(short, floats[:32] / np.linalg.norm(floats[:32]), atol=1e-5)


def test_ollama_embed_and_the_older_embeddings(olla: ollama.Client) -> None:
    got = olla.embed(model=MODEL, input=[EXAMPLE, FAR])
    v = np.array(got.embeddings)
    assert v.shape == (2, 384) and np.allclose(v[0, :5], EXAMPLE_START, atol=1e-4)
    assert got.prompt_eval_count and got.prompt_eval_count > 4
    old = olla.embeddings(model="all-minilm", prompt=EXAMPLE)  # the alias, the older route
    assert np.allclose(np.array(old.embedding), v[0], atol=1e-5)
    assert olla.embed(model=MODEL, input=[]).embeddings == []


def test_a_long_input_is_cut_only_where_the_dialect_says(oai: OpenAI, olla: ollama.Client, daemon_url: str) -> None:
    long = "word " * 600  # past the model's 256 tokens
    with pytest.raises(openai.BadRequestError) as e:
        oai.embeddings.create(model=MODEL, input=["fine", long])
    assert "256" in e.value.message and "input 1" in e.value.message
    assert len(olla.embed(model=MODEL, input=long).embeddings[0]) == 384  # Ollama truncates by default
    refused = httpx.post(f"{daemon_url}/api/embed", json={"model": MODEL, "input": long, "truncate": False})
    assert refused.status_code == 400 and "256" in refused.json()["error"]


@pytest.mark.parametrize(
    "path, body, needle",
    [
        ("/v1/embeddings", {"model": MODEL, "input": ""}, "empty"),
        ("/v1/embeddings", {"model": MODEL, "input": []}, "empty"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": 4096}, "384"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "colour": "red"}, "colour"),
        ("/v1/embeddings", {"model": "smollm2-135m", "input": "x"}, "not an embedding model"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "embedding"),
        ("/v1/embeddings", {"model": MODEL, "input": [[101, 999999]]}, "token id 999999"),
        ("/api/embed", {"model": MODEL, "input": "x", "colour": "red"}, "colour"),
        ("/api/embed", {"model": "no-such-model", "input": "x"}, "no-such-model"),
    ],
)
def test_bad_requests_get_a_clear_error_in_their_dialect(daemon_url: str, path: str, body: dict, needle: str) -> None:
    resp = httpx.post(f"{daemon_url}{path}", json=body, timeout=60)
    assert resp.status_code in (400, 404), resp.text
    err = resp.json()["error"]
    message = err if path.startswith("/api/") else err["message"]
    assert isinstance(message, str) and needle in message, resp.text


def test_an_answer_larger_than_a_ring_frame_arrives_whole(oai: OpenAI) -> None:
    """1,500 vectors are ~3 MB of base64: more than one frame of the worker's event
    ring takes, so the worker sends them in parts and the daemon joins them."""
    texts = [f"item {i}" for i in range(1500)]
    resp = oai.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in resp.data] == list(range(1500))
    v = np.array([d.embedding for d in resp.data])
    assert v.shape == (1500, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    one = np.array(oai.embeddings.create(model=MODEL, input=texts[1234]).data[0].embedding)
    assert float(one @ v[1234]) > 0.99999


def test_many_clients_at_once_each_get_their_own_vectors(oai: OpenAI) -> None:
    texts = [f"Request {i} is about {'cats' if i % 2 else 'the stock market'} and little else." for i in range(24)]
    alone = {t: np.array(oai.embeddings.create(model=MODEL, input=t).data[0].embedding) for t in texts[:3]}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda t: oai.embeddings.create(model=MODEL, input=[t, t.upper()]), texts))
    for t, resp in zip(texts, got):
        assert len(resp.data) == 2
        if t in alone:
            assert float(np.array(resp.data[0].embedding) @ alone[t]) > 0.99999


def test_a_killed_embedding_worker_loses_no_request(oai: OpenAI) -> None:
    """Requests queued or running when the worker dies are answered by the next one
    (an Embed has no output to have started), never lost."""
    oai.embeddings.create(model=MODEL, input="up")
    (worker,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    texts = [("word " * 200 + str(i)) for i in range(64)]

    def ask(i: int) -> int:
        return len(oai.embeddings.create(model=MODEL, input=texts[i : i + 8]).data)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(0, 64, 8)]
        time.sleep(0.3)
        os.kill(worker["pid"], signal.SIGKILL)
        assert [f.result(timeout=300) for f in futures] == [8] * 8
    (after,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    assert after["pid"] != worker["pid"]


DOCS = ["Berlin is in Germany.", "Paris is the capital of France.", "Bananas are yellow."]


def test_rerank_orders_documents_by_relevance(daemon_url: str) -> None:
    """The default embedding model reranks by cosine: the relevant document first,
    in the Jina / Cohere / llama-server shape, top_n and return_documents honoured."""
    body = {
        "model": MODEL,
        "query": "What is the capital of France?",
        "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2]],
    }
    got = httpx.post(f"{daemon_url}/v1/rerank", json=body, timeout=60).json()
    results = got["results"]
    assert [r["index"] for r in results][0] == 1 and results[0]["document"] == {"text": DOCS[1]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    short = httpx.post(f"{daemon_url}/rerank", json={**body, "top_n": 1, "return_documents": False}).json()
    assert short["results"] == [{"index": 1, "relevance_score": pytest.approx(scores[0], abs=1e-5)}]


def test_a_cross_encoder_scores_pairs_as_numpy_does(daemon_url: str, session_presets: Path) -> None:
    from bert_reference import relevance

    from mlxd_worker.models import embedder

    directory = Path(tomllib.loads((session_presets / "tiny-reranker.toml").read_text())["model"])
    query = "What is the capital of France?"
    got = httpx.post(
        f"{daemon_url}/v1/rerank", json={"model": "tiny-reranker", "query": query, "documents": DOCS}, timeout=120
    ).json()
    tokenizer = embedder.load(directory)
    want = [relevance(directory, *tokenizer.pair(query, d)) for d in DOCS]
    by_index = {r["index"]: r["relevance_score"] for r in got["results"]}
    assert np.allclose([by_index[i] for i in range(3)], want, atol=1e-5)
    assert [r["index"] for r in got["results"]] == sorted(range(3), key=lambda i: -want[i])
    # A cross-encoder gives no vectors; a chat model no scores.
    refused = httpx.post(f"{daemon_url}/v1/embeddings", json={"model": "tiny-reranker", "input": "x"}, timeout=60)
    assert refused.status_code == 400 and "rerank" in refused.json()["error"]["message"]
    chat = httpx.post(f"{daemon_url}/v1/rerank", json={"model": "smollm2-135m", "query": "q", "documents": ["d"]})
    assert chat.status_code == 400 and "not a rerank" in chat.json()["error"]["message"]
    empty = httpx.post(f"{daemon_url}/v1/rerank", json={"model": MODEL, "query": "q", "documents": []})
    assert empty.status_code == 400 and "documents" in empty.json()["error"]["message"]


def test_a_decoder_embedding_model_gives_its_last_token_vectors(
    oai: OpenAI, daemon_url: str, session_presets: Path
) -> None:
    """A tiny Qwen3 in Qwen3-Embedding's layout, with a preset that says nothing but
    its path (its sentence-transformers files make it an embedding model): vectors
    are mlx-lm's own backbone's last-token states, a rerank's query gets the model's
    query prompt, and a chat request is refused."""
    from decoder_embedder import QUERY_PROMPT, vector
    from transformers import AutoTokenizer

    name = "tiny-qwen3-embedding"
    directory = Path(tomllib.loads((session_presets / f"{name}.toml").read_text())["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(directory))

    def reference(text: str) -> np.ndarray:
        return vector(directory, list(tokenizer(text, add_special_tokens=True)["input_ids"]))

    texts = [*CLOSE, FAR]
    got = np.array([d.embedding for d in oai.embeddings.create(model=name, input=texts).data])
    assert got.shape == (3, 64)
    for text, v in zip(texts, got):
        assert float(v @ reference(text)) >= 0.9999
    query = "What is the capital of France?"
    ranked = httpx.post(
        f"{daemon_url}/v1/rerank", json={"model": name, "query": query, "documents": DOCS}, timeout=120
    ).json()
    q = reference(QUERY_PROMPT + query)
    want = [float(q @ reference(d)) for d in DOCS]
    by_index = {r["index"]: r["relevance_score"] for r in ranked["results"]}
    assert np.allclose([by_index[i] for i in range(len(DOCS))], want, atol=1e-4)
    with pytest.raises(openai.BadRequestError, match="embedding"):
        oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_a_chat_model_reranks_by_its_yes_no_verdict(daemon_url: str) -> None:
    """A preset's [rerank] makes a chat model a reranker (a tiny random hybrid: linear
    and full attention layers): each document's score is the model's probability of
    "yes" over "no" as the first token of its answer to Qwen3-Reranker's question, as
    mlx-lm's own forward pass gives it, short prompts batched and a long one chunked."""
    import math

    import mlx.core as mx
    import mlx_lm
    from families import family_dir

    query = "What is the capital of France?"
    # The last one makes a prompt past one pass's 512 tokens: prefilled in chunks.
    documents = [*DOCS, "Paris, on the Seine, is the capital city of France. " * 60]
    got = httpx.post(
        f"{daemon_url}/v1/rerank",
        json={"model": "tiny-chat-rerank", "query": query, "documents": documents},
        timeout=300,
    ).json()
    model, tok = mlx_lm.load(str(family_dir("qwen3_next")))
    yes, no = tok.encode("yes", add_special_tokens=False)[0], tok.encode("no", add_special_tokens=False)[0]
    want = []
    for doc in documents:
        messages = [
            {
                "role": "system",
                "content": "Judge whether the Document meets the requirements based on the Query and the Instruct "
                'provided. Note that the answer can only be "yes" or "no".',
            },
            {
                "role": "user",
                "content": "<Instruct>: Find the passage that answers the question\n"
                f"<Query>: {query}\n<Document>: {doc}",
            },
        ]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
        last = model(mx.array(ids)[None])[0, -1]
        want.append(1 / (1 + math.exp(float(last[no]) - float(last[yes]))))
        assert doc != documents[-1] or len(ids) > 512
    by_index = {r["index"]: r["relevance_score"] for r in got["results"]}
    assert np.allclose([by_index[i] for i in range(4)], want, atol=1e-4), (by_index, want)
    assert got["usage"]["prompt_tokens"] > 512 + 3 * 40
    # Still a chat model: it generates as before, and gives no vectors.
    chat = httpx.post(
        f"{daemon_url}/v1/chat/completions",
        json={"model": "tiny-chat-rerank", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        timeout=120,
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    vectors = httpx.post(f"{daemon_url}/v1/embeddings", json={"model": "tiny-chat-rerank", "input": "x"})
    assert vectors.status_code == 400
