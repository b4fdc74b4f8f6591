"""Images in chat through the daemon: a tiny random Qwen2-VL (vision_model.py) served
by the vision engine (mlx-vlm), its greedy answers equal to mlx-vlm's own generate
for the same images and prompt, images kept where the client put them among the
text, several requests in one batch, and hostile images refused with a clear error
while the daemon keeps serving."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import tomllib
from openai import OpenAI
from vision_model import data_url, native, picture, prompt_ids

from conftest import control

MODEL = "tiny-vlm"
TOKENS = 8
IMAGE = {"type": "image"}


def text(t: str) -> dict[str, str]:
    return {"type": "text", "text": t}


def model_dir(session_presets: Path) -> Path:
    return Path(tomllib.loads((session_presets / f"{MODEL}.toml").read_text())["model"])


def ask(oai: OpenAI, content: list[dict], max_tokens: int = TOKENS) -> str:
    resp = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0
    )
    return resp.choices[0].message.content or ""


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def test_an_image_answer_equals_mlx_vlms_own(oai: OpenAI, session_presets: Path) -> None:
    image = picture(1)
    got = ask(oai, [image_part(image), {"type": "text", "text": "What is in this picture?"}])
    want = native(
        model_dir(session_presets),
        [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}],
        [image],
        TOKENS,
    )
    assert got == want and got


def test_every_dialects_image_form_reaches_the_model(
    oai: OpenAI, claude: anthropic.Anthropic, olla: ollama.Client
) -> None:
    """Anthropic image blocks, Responses input_image parts and Ollama's images (chat
    and generate) give the answer the OpenAI form gives for the same image and
    question."""
    image = picture(7)
    b64 = base64.b64encode(image).decode()
    question = "What is in this picture?"
    want = ask(oai, [image_part(image), text(question)])
    message = claude.messages.create(
        model=MODEL,
        max_tokens=TOKENS,  # no temperature: the model's default, greedy (no generation_config.json)
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    assert "".join(b.text for b in message.content if b.type == "text") == want
    response = oai.responses.create(
        model=MODEL,
        max_output_tokens=TOKENS,
        temperature=0,
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": data_url(image), "detail": "auto"},
                    {"type": "input_text", "text": question},
                ],
            }
        ],
    )
    assert response.output_text == want
    chat = olla.chat(
        model=MODEL,
        messages=[{"role": "user", "content": question, "images": [b64]}],
        options={"temperature": 0, "num_predict": TOKENS},
    )
    assert chat.message.content == want
    generated = olla.generate(
        model=MODEL, prompt=question, images=[b64], options={"temperature": 0, "num_predict": TOKENS}
    )
    assert generated.response == want


def test_images_reach_the_model_where_the_client_put_them(oai: OpenAI, session_presets: Path) -> None:
    """Two images around the text, in both orders; and two different pictures give
    two different answers."""
    a, b = picture(2), picture(3, (64, 96))
    directory = model_dir(session_presets)
    first = ask(oai, [image_part(a), {"type": "text", "text": "left or right?"}, image_part(b)])
    swapped = ask(oai, [image_part(b), {"type": "text", "text": "left or right?"}, image_part(a)])
    text_first = ask(oai, [{"type": "text", "text": "left or right?"}, image_part(a), image_part(b)])
    assert first == native(
        directory, [{"type": "image"}, {"type": "text", "text": "left or right?"}, {"type": "image"}], [a, b], TOKENS
    )
    assert swapped == native(
        directory, [{"type": "image"}, {"type": "text", "text": "left or right?"}, {"type": "image"}], [b, a], TOKENS
    )
    assert text_first == native(
        directory, [{"type": "text", "text": "left or right?"}, {"type": "image"}, {"type": "image"}], [a, b], TOKENS
    )
    assert len({first, swapped, text_first}) == 3


def batched_steps(daemon_url: str) -> float:
    """The vision worker's steps that advanced more than one sequence (/metrics)."""
    series = f'mlxd_worker_batch_size_bucket{{model="{MODEL}",le='
    counts = {
        line[len(series) :].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{daemon_url}/metrics").text.splitlines()
        if line.startswith(series)
    }
    return counts.get('"+Inf"', 0.0) - counts.get('"1"', 0.0)


def test_requests_in_one_batch_answer_as_alone(oai: OpenAI, daemon_url: str) -> None:
    """Four image requests at once share the batch's steps (the batch-size
    histogram says so) and answer as each does alone."""
    images = [picture(10 + i, (56 + 14 * i, 70)) for i in range(4)]
    alone = [ask(oai, [image_part(img), {"type": "text", "text": "Describe it."}]) for img in images]
    before = batched_steps(daemon_url)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda img: ask(oai, [image_part(img), {"type": "text", "text": "Describe it."}]), images)
        )
    assert together == alone
    assert len(set(alone)) > 1
    deadline = time.monotonic() + 10  # the worker reports its steps every half second
    while batched_steps(daemon_url) <= before:
        assert time.monotonic() < deadline, "no step advanced two image requests"
        time.sleep(0.2)
    # Text alone works as for any model.
    assert ask(oai, "Hello there")  # type: ignore[arg-type]


def test_output_formats_and_logprobs_work_with_images(oai: OpenAI) -> None:
    """A JSON schema constrains an image request's answer (alone and beside a plain
    one in the batch); logprobs come with each token, the greedy pick on top, and
    leave the answer as it is without them."""
    schema = {
        "type": "object",
        # Bounded: a random model would write digits to max_tokens.
        "properties": {"label": {"enum": ["cat", "dog", "car"]}, "blurry": {"type": "boolean"}},
        "required": ["label", "blurry"],
        "additionalProperties": False,
    }
    content = [image_part(picture(21)), text("Label this picture as JSON.")]

    def structured() -> Any:
        return oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "label", "schema": schema}},
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        plain = pool.submit(ask, oai, [image_part(picture(22)), text("Describe it.")])
        together = structured()
        assert plain.result()
    alone = structured()
    for resp in (alone, together):
        assert resp.choices[0].finish_reason == "stop", resp.choices[0]
        answer = json.loads(resp.choices[0].message.content or "")
        assert answer["label"] in ("cat", "dog", "car") and isinstance(answer["blurry"], bool), answer
    assert alone.choices[0].message.content == together.choices[0].message.content

    question = [image_part(picture(23)), text("What is in this picture?")]
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        max_tokens=TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries and len(entries) == resp.usage.completion_tokens  # type: ignore[union-attr]
    for entry in entries:
        assert entry.top_logprobs[0].token == entry.token and entry.logprob <= 0
    assert resp.choices[0].message.content == ask(oai, question)


def cached_tokens(resp: Any) -> int:
    details = resp.usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


def test_a_new_question_about_the_same_image_reuses_its_prefix(oai: OpenAI, session_presets: Path) -> None:
    """The image's prefix (vision features and KV) is reused by a re-ask with a new
    question, whose answer stays mlx-vlm's own cold answer; the same tokens with
    another image's pixels reuse nothing."""
    image, other = picture(11, size=(300, 200)), picture(12, size=(300, 200))

    def create(data: bytes, question: str) -> Any:
        return oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [image_part(data), text(question)]}],
            max_tokens=TOKENS,
            temperature=0,
        )

    first = create(image, "what is it?")
    again = create(image, "which colours are in it?")
    elsewhere = create(other, "which colours are in it?")
    assert cached_tokens(first) == 0
    # Everything before the parting: the turn's start and the image's tokens.
    questions = ("what is it?", "which colours are in it?")
    ids = [prompt_ids(model_dir(session_presets), [IMAGE, text(q)], [image]) for q in questions]
    parting = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    assert parting > 16 and cached_tokens(again) == parting, again.usage
    assert cached_tokens(elsewhere) == 0, elsewhere.usage
    want = native(model_dir(session_presets), [IMAGE, text("which colours are in it?")], [image], TOKENS)
    # mlx-lm's streaming detokenizer (mlxd's, as mlx_lm.server's) drops the answer's
    # leading space; mlx-vlm's generate keeps it.
    assert again.choices[0].message.content == want.removeprefix(" ")


GEMMA3 = "tiny-gemma3-vlm"


def gemma3_dir(session_presets: Path) -> Path:
    return Path(tomllib.loads((session_presets / f"{GEMMA3}.toml").read_text())["model"])


def with_images(content: list[dict[str, str]], images: list[bytes]) -> list[dict[str, Any]]:
    """native()'s parts as OpenAI chat parts: each image part takes the next image."""
    pictures = iter(images)
    return [image_part(next(pictures)) if part["type"] == "image" else part for part in content]


def gemma3_chat(oai: OpenAI, messages: list[Any]) -> Any:
    return oai.chat.completions.create(model=GEMMA3, messages=messages, max_tokens=TOKENS, temperature=0)


@pytest.mark.parametrize(
    "content, images",
    [
        ([IMAGE, text("What is in this picture?")], [picture(1)]),
        ([IMAGE, text("left or right?"), IMAGE], [picture(2), picture(3, (64, 96))]),
        ([text("left or right?"), IMAGE, IMAGE], [picture(2), picture(3, (64, 96))]),
    ],
)
def test_a_gemma3_answer_equals_mlx_vlms_own(
    oai: OpenAI, session_presets: Path, content: list[dict[str, str]], images: list[bytes]
) -> None:
    """Gemma 3 (vision_model.build_gemma3): its template writes the BOS (one, not
    the tokenizer's second), an image part becomes <start_of_image> expanded to the
    image's soft tokens, and its sliding layers' 16-token window is shorter than
    these prompts."""
    resp = gemma3_chat(oai, [{"role": "user", "content": with_images(content, images)}])
    got = resp.choices[0].message.content or ""
    # mlx-lm's streaming detokenizer drops an answer's leading space; mlx-vlm's keeps it.
    assert got and got == native(gemma3_dir(session_presets), content, images, TOKENS).removeprefix(" ")


def test_a_gemma3_conversation_reuses_its_earlier_turns(oai: OpenAI, session_presets: Path) -> None:
    """mlx-vlm cuts back only dense-KV snapshots, not Gemma 3's sliding-window ones:
    a new question about the same image reuses no KV (its vision features only), but
    the next turn of a conversation reuses the whole earlier prompt, and answers as
    mlx-vlm does from scratch."""
    image = picture(11, size=(300, 200))
    turn = [IMAGE, text("Please look at this picture and tell me what it is.")]
    first = gemma3_chat(oai, [{"role": "user", "content": with_images(turn, [image])}])
    answer = first.choices[0].message.content or ""
    second = gemma3_chat(
        oai,
        [
            {"role": "user", "content": with_images(turn, [image])},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And its colours?"},
        ],
    )
    assert cached_tokens(first) == 0
    # The first prompt less its last token (mlx-vlm's guard): its image's tokens and more.
    assert cached_tokens(second) >= 16, second.usage
    history = [{"role": "user", "content": turn}, {"role": "assistant", "content": [text(answer)]}]
    want = native(gemma3_dir(session_presets), [text("And its colours?")], [image], TOKENS, history)
    assert second.choices[0].message.content == want.removeprefix(" ")


def test_a_seeded_sample_is_the_same_alone_or_in_a_batch(oai: OpenAI) -> None:
    """Each row samples with its own sampler inside mlx-vlm's greedy batch."""

    def sample(seed: int) -> str:
        resp = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [image_part(picture(20)), text("Tell me.")]}],
            max_tokens=TOKENS,
            temperature=0.9,
            seed=seed,
        )
        return resp.choices[0].message.content or ""

    alone = sample(7)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = list(pool.map(sample, [7, 8, 9]))
    assert together[0] == alone
    assert len(set(together)) > 1  # other seeds draw other tokens
    assert alone != ask(oai, [image_part(picture(20)), text("Tell me.")])  # not the greedy answer


def test_images_are_counted_and_a_bad_one_in_a_count_is_an_error(claude: anthropic.Anthropic) -> None:
    b64 = base64.b64encode(picture(21)).decode()
    question = {"type": "text", "text": "What is in this picture?"}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    with_image = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [image, question]}])
    text_only = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [question]}])
    # 100 × 80 pixels: 4 × 3 merged patches of 28 pixels, and the two markers around them.
    assert with_image.input_tokens - text_only.input_tokens >= 12
    truncated = base64.b64encode(picture(21)[:200]).decode()
    broken = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": truncated}}
    with pytest.raises(anthropic.BadRequestError, match="could not be decoded"):
        claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [broken, question]}])
    assert claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [question]}])


def _bomb() -> bytes:
    """A valid PNG header claiming 100,000 × 100,000 pixels (a few hundred bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "url, needle",
    [
        (data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"), "SVG"),
        (data_url(picture(4)[:200]), "could not be decoded"),
        (data_url(_bomb()), "pixels"),
        ("http://localhost:9/picture.png", "not in allowed_image_hosts"),
        ("file:///etc/passwd", "only data: and http"),
        ("data:image/png;base64,@@@", "base64"),
    ],
)
def test_a_hostile_image_gets_a_clear_error_and_the_daemon_keeps_serving(oai: OpenAI, url: str, needle: str) -> None:
    """Refused in the client's dialect; the same worker (no restart) serves the next."""
    assert ask(oai, [image_part(picture(5)), {"type": "text", "text": "first"}], max_tokens=2)
    (worker,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    with pytest.raises(openai.BadRequestError, match=needle):
        ask(oai, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}])
    assert ask(oai, [image_part(picture(5)), {"type": "text", "text": "and this?"}], max_tokens=2)
    (after,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    assert after["pid"] == worker["pid"]


def test_a_50_mb_image_gets_a_413_in_each_dialect(oai: OpenAI, claude: anthropic.Anthropic) -> None:
    """Far over the 8 MiB body limit: refused before any parsing, in the client's
    own error shape, and the same worker serves the next request."""
    (worker,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    b64 = "A" * (50 << 20)
    with pytest.raises(openai.APIStatusError, match="8 MiB") as refused:
        ask(oai, [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}])
    assert refused.value.status_code == 413
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}}
    with pytest.raises(anthropic.APIStatusError, match="8 MiB") as too_large:
        claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [image]}])
    assert too_large.value.status_code == 413
    assert too_large.value.body["error"]["type"] == "request_too_large"  # type: ignore[index, call-overload]
    assert ask(oai, [image_part(picture(5)), {"type": "text", "text": "and this?"}], max_tokens=2)
    (after,) = [w for w in control().get("/admin/ps").json()["workers"] if w["model"] == MODEL]
    assert after["pid"] == worker["pid"]


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """An HTTP server on loopback (listed in the session daemon's
    MLXD_ALLOWED_IMAGE_HOSTS) with a picture and the ways a fetch goes wrong."""
    files = {
        "/picture.png": (200, picture(8)),
        "/drawing.svg": (200, b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        "/huge.png": (200, picture(8) + b"\0" * (7 << 20)),
        "/unsized.png": (200, picture(8) + b"\0" * (7 << 20)),
        "/moved.png": (302, b""),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = files.get(self.path, (404, b"no such file"))
            self.send_response(status)
            if status == 302:
                self.send_header("Location", "/picture.png")
            if self.path != "/unsized.png":  # that one ends when the connection closes
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_image_url_from_an_allowed_host_is_fetched(
    oai: OpenAI, claude: anthropic.Anthropic, image_host: str
) -> None:
    """OpenAI image_url and Anthropic url sources from a listed host answer as the
    same image inline does."""
    question = "What is in this picture?"
    want = ask(oai, [image_part(picture(8)), text(question)])
    url = f"{image_host}/picture.png"
    assert ask(oai, [{"type": "image_url", "image_url": {"url": url}}, text(question)]) == want
    message = claude.messages.create(
        model=MODEL,
        max_tokens=TOKENS,
        messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": url}}, text(question)]}
        ],
    )
    assert message.content[0].text == want  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "path, needle",
    [
        ("/moved.png", "redirects are not followed"),
        ("/missing.png", "answered 404"),
        ("/huge.png", "larger than 6 MiB together"),
        ("/unsized.png", "larger than 6 MiB together"),
        ("/drawing.svg", "SVG"),
    ],
)
def test_a_bad_image_url_gets_a_clear_error(oai: OpenAI, image_host: str, path: str, needle: str) -> None:
    with pytest.raises(openai.BadRequestError, match=needle):
        ask(oai, [{"type": "image_url", "image_url": {"url": image_host + path}}, text("hi")])


def test_an_image_to_a_text_model_is_refused_before_loading(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="takes no images"):
        oai.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": [image_part(picture(6)), {"type": "text", "text": "hi"}]}],
            max_tokens=2,
        )


def test_serving_imports_none_of_mlx_vlms_heavy_dependencies(session_presets: Path) -> None:
    """mlx-vlm is installed without its declared dependencies (scripts/setup): loading
    and running a model imports none of them."""
    script = f"""
import sys
from mlxd_worker.engines.vision import VisionBackend
backend = VisionBackend()
backend.load({str(model_dir(session_presets))!r}, {{"prompt_cache_bytes": 1 << 26}})
uid = backend.insert([1, 2, 3], 2, None)
while not any(f for _, _, f in backend.step()):
    pass
heavy = {{"cv2", "datasets", "mlx_audio", "miniaudio", "fastapi", "uvicorn", "torch", "torchvision"}}
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""
    worker = Path(__file__).resolve().parents[2] / "python-worker"
    env = {**os.environ, "PYTHONPATH": str(worker)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
