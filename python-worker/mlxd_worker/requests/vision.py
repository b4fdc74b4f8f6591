"""Images in a chat request, planned on the reader thread like the rest of a prompt:
decoded (with limits: a hostile file is the client's error, never the worker's
crash), placed in the conversation where the client put them, and turned into the
model's inputs by its own processor (mlx-vlm's), which expands each image into the
model's image tokens and computes the pixel arrays. The engine thread only runs the
vision tower and the language model (engines/vision.py)."""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RequestError
from ..io.protocol import ChatMessage

# Pixels one image may have once decoded (a decompression bomb is refused before
# its pixels are allocated: Pillow checks the header's size against this), and all
# of a request's images together (checked on the headers, before any is decoded).
MAX_IMAGE_PIXELS = 40_000_000
MAX_REQUEST_PIXELS = 80_000_000
# Formats the worker decodes (what every dialect's clients send); GIF: its first frame.
FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF"})


@dataclass
class VisionInput:
    """A request's images as the model's processor made them, numpy arrays keyed by
    the names the model's `get_input_embeddings` takes (pixel_values,
    image_grid_thw, ...)."""

    arrays: dict[str, np.ndarray]
    # A hash of the images' decoded pixels: the same images have the same key. The
    # prefix cache and the vision-feature memo are keyed by it.
    key: int


def open_image(raw: bytes, index: int) -> Any:
    """An image from its file's bytes, opened (its header read, its pixels not yet
    decoded); RequestError says what is wrong with it."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow warns (and past twice that raises): both refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"image {index} has more than {MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as e:  # not an image at all
        raise RequestError(f"image {index} could not be decoded: {e}") from None
    if image.format not in FORMATS:
        raise RequestError(
            f"image {index} is {image.format or 'in an unknown format'}; send {', '.join(sorted(FORMATS))}"
        )
    return image


def decode_image(image: Any, index: int) -> Any:
    """An opened image's pixels, upright (its EXIF orientation applied, as cameras
    mean it), in RGB."""
    from PIL import ImageOps

    try:
        image.seek(0)  # an animation's first frame
        image.load()
        # In place and converted only when needed: each copy of a 1024² image
        # costs milliseconds of its time to first token.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # truncated, corrupt
        raise RequestError(f"image {index} could not be decoded: {e}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def template_owner(processor: Any) -> Any:
    """What renders the chat template: the processor, or its tokenizer where the
    processor has none (mlx-vlm's Gemma 3 processor, among others, leaves it
    there), as mlx-vlm's own prompt rendering picks it."""
    return processor if getattr(processor, "chat_template", None) is not None else processor.tokenizer


class VisionPrompts:
    """A vision-language model's prompts: chats whose user turns hold images among
    their text, rendered by the model's processor (its chat template with image
    parts in order; its image tokens expanded to each image's size)."""

    def __init__(self, processor: Any, family: str) -> None:
        from mlx_vlm.utils import should_add_special_tokens

        self.processor = processor
        self.template = template_owner(processor)
        # Asked of the template's owner: a Gemma template writes the BOS, and the
        # tokenizer would add another (mlx-vlm 0.7.10 asks the processor, whose
        # template is None, and does add it).
        self.add_special_tokens = bool(should_add_special_tokens(family, self.template))
        # Stands for an image inside a message's text while the messages go through
        # the tool-format rewriting (which only joins strings); random, so that no
        # client text can forge one.
        self._marker = f"<mlxd-image-{secrets.token_hex(8)}>"

    def with_markers(self, messages: list[ChatMessage]) -> tuple[list[ChatMessage], list[int]]:
        """Each message with parts as one text, an image marker where each image
        was; and the images' indices (into the request's images) in that order."""
        out: list[ChatMessage] = []
        order: list[int] = []
        for m in messages:
            parts = m.get("parts") or []
            if not parts:
                out.append(m)
                continue
            pieces: list[str] = []
            for part in parts:
                if part.get("type") == "image":
                    order.append(int(part["image"]))  # type: ignore[typeddict-item]
                    pieces.append(self._marker)
                else:
                    pieces.append(str(part.get("text") or ""))
            out.append({**m, "content": "".join(pieces), "parts": []})
        return out, order

    def as_parts(self, messages: list[Any]) -> list[Any]:
        """The template's messages with each marked text split into text and image
        parts, as chat templates of vision models take them."""
        out = []
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str) or self._marker not in content:
                out.append(m)
                continue
            parts: list[dict[str, str]] = []
            for piece in re.split(f"({re.escape(self._marker)})", content):
                if piece == self._marker:
                    parts.append({"type": "image"})
                elif piece:
                    parts.append({"type": "text", "text": piece})
            out.append({**m, "content": parts})
        return out

    def render(
        self, messages: list[Any], images: Sequence[bytes], order: list[int], kwargs: dict[str, object]
    ) -> tuple[list[int], VisionInput]:
        """The prompt's tokens (image tokens expanded) and its images' arrays."""
        if any(not 0 <= i < len(images) for i in order):
            raise RequestError(f"a message refers to an image past the {len(images)} sent")
        opened = [open_image(images[i], n) for n, i in enumerate(order)]
        pixels = sum(image.width * image.height for image in opened)
        if pixels > MAX_REQUEST_PIXELS:
            raise RequestError(f"the request's images have {pixels:,} pixels, more than {MAX_REQUEST_PIXELS:,}")
        decoded = [decode_image(image, n) for n, image in enumerate(opened)]
        # Only what the template reads: transformers' processors hand the rest to the
        # processor's call (with a warning per request).
        source = str(getattr(self.template, "chat_template", None) or "")
        used = {k: v for k, v in kwargs.items() if k in source}
        text = self.template.apply_chat_template(
            self.as_parts(messages), add_generation_prompt=True, tokenize=False, **used
        )
        try:
            out = self.processor(
                text=[text],
                images=decoded,
                padding=False,
                return_tensors="np",
                # Templates that write the BOS themselves (Gemma's) must not get another.
                add_special_tokens=self.add_special_tokens,
            )
        except Exception as e:  # an image the processor cannot take (an extreme aspect ratio)
            raise RequestError(f"the model's processor refused the request's images: {e}") from None
        ids = [int(t) for t in np.asarray(out["input_ids"])[0]]
        arrays = {k: np.asarray(v) for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        return ids, VisionInput(arrays, content_key(decoded))


def content_key(images: list[Any]) -> int:
    """A 63-bit hash of the decoded images' pixels, in order (computed here, on the
    reader thread). One worker's processor turns the same pixels into the same
    arrays, and the pixels are a fifth of the bytes of its float arrays."""
    digest = hashlib.blake2b(digest_size=8)
    for image in images:
        digest.update(f"{image.mode}:{image.width}x{image.height};".encode())
        digest.update(image.tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1
