"""Sample -> model inputs: chat template, supervised-token mask, image-token expansion, pixels.

The label mask comes from the chat template itself: each assistant turn's span is located
by rendering the conversation up to that turn (with and without the reply) and mapping those
character offsets to tokens through the tokenizer's offset mapping. Nothing here knows what
a particular template's role markers look like.
"""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..encoders import ImageTransform
from ..loss import IGNORE_INDEX
from ..config import DataConfig
from .sample import ROLES, Sample, SampleError

DEFAULT_MAX_IMAGE_PIXELS = DataConfig.max_image_pixels


class VLMProcessor:
    """Turns a `Sample` into `input_ids`, `labels` and `pixel_values` for one model."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: ImageTransform,
        image_token: str,
        tokens_per_image: int,
        max_length: int | None = None,
        truncate_text: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.truncate_text = truncate_text
        """Over-long samples: cut the text after the last image token (True) or reject them (False)."""
        self.max_image_pixels = max_image_pixels
        """Images declaring more pixels are skipped before decoding (`data.max_image_pixels`; None: no limit)."""

    def __call__(self, sample: Sample, for_generation: bool = False, with_pixels: bool = True) -> dict[str, Any]:
        """Returns input_ids [seq], labels [seq], pixel_values [num_images, 3, H, W] or None, id.

        for_generation: encode only the prompt (up to the last user turn) plus the
        generation prompt, for `predict` / `generate`.
        with_pixels=False skips image decoding (the caller supplies cached features).
        """
        self.check(sample, for_generation)
        messages = sample.prompt_messages() if for_generation else sample.messages
        ids, labels = self.tokenize(messages, add_generation_prompt=for_generation)
        num_images = sum(m["content"].count(self.image_token) for m in messages)
        ids, labels = self._expand_images(ids, labels)
        if self.max_length is not None and not for_generation and len(ids) > self.max_length:
            ids, labels = self._fit_length(sample.id, ids, labels)
        images = self.load_images(sample)[:num_images] if with_pixels else []
        pixel_values = torch.stack([self.image_transform(im) for im in images]) if images else None
        return {
            "id": sample.id,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }

    def _fit_length(self, sample_id: str, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Truncate the text after the last image token (data.truncate_text), never through image tokens."""
        too_long = f"is {len(ids)} tokens with image tokens counted, over data.max_length={self.max_length}"
        if not self.truncate_text:
            raise SampleError(
                sample_id, "too_long",
                f"{too_long}; raise data.max_length, shorten the sample or set data.truncate_text=true.",
            )
        images_end = max((i + 1 for i, t in enumerate(ids) if t == self.image_token_id), default=0)
        if images_end > self.max_length:
            raise SampleError(
                sample_id, "too_long",
                f"{too_long} and its image tokens alone reach position {images_end}, so truncating the text "
                "cannot fit it; raise data.max_length or use fewer images.",
            )
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(
                sample_id, "too_long", f"{too_long} and no answer token is left after truncation; raise data.max_length.",
            )
        return ids, labels

    def check(self, sample: Sample, for_generation: bool = False) -> None:
        """Training needs an answer to learn from; generation (predict) does not."""
        check_sample(sample, self.image_token, needs_answer=not for_generation)

    def load_images(self, sample: Sample) -> list[Image.Image]:
        return load_images(sample, self.max_image_pixels)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tokenize(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation, and labels that keep only assistant turns."""
        text = self.render(messages, add_generation_prompt)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[: k + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise ValueError(
                    "The chat template renders a conversation differently from its prefixes, so assistant "
                    "turns cannot be located; use a template whose output grows turn by turn."
                )
            # Trailing newlines after the end-of-turn marker are layout, not part of the reply.
            spans.append((len(before), max(len(through.rstrip()), len(before) + 1)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
            for token, (start, _) in zip(ids, encoded["offset_mapping"])
        ]
        return ids, labels

    def _expand_images(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """Each image token becomes `tokens_per_image` copies; the fusion fills them in the model.

        Strategies that occupy no positions (tokens_per_image == 0) keep one image token as a
        plain marker, so they can still tell where in the text each image appears.
        """
        copies = self.tokens_per_image or 1
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                out_ids += [token] * copies
                out_labels += [IGNORE_INDEX] * copies
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels


def check_sample(sample: Sample, image_token: str, needs_answer: bool = True) -> None:
    """Structural checks that need no image decoding; raise `SampleError` naming the sample.

    needs_answer: a training sample without an assistant turn has no token to learn from (`no_answer`)."""
    if not sample.messages:
        raise SampleError(sample.id, "empty", "has no messages.")
    expected = "user"
    for i, message in enumerate(sample.messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise SampleError(sample.id, "malformed", f"message {i} has role {role!r}; use one of {ROLES}.")
        if not isinstance(content, str) or not content.strip():
            raise SampleError(sample.id, "empty_turn", f"message {i} ({role}) is empty.")
        if role == "system":
            if i != 0:
                raise SampleError(sample.id, "alternation", "a system message may only come first.")
            continue
        if role != expected:
            raise SampleError(
                sample.id, "alternation", f"message {i} is from {role} but {expected} was expected; "
                "turns must alternate user / assistant, starting with user.",
            )
        if role == "assistant" and image_token in content:
            raise SampleError(sample.id, "image_in_answer", f"assistant message {i} contains {image_token}.")
        expected = "assistant" if role == "user" else "user"
    if needs_answer and not any(m["role"] == "assistant" for m in sample.messages):
        raise SampleError(
            sample.id, "no_answer", "has no assistant turn, so there is nothing to learn; add the answer or drop it.",
        )
    tags = sum(m["content"].count(image_token) for m in sample.messages)
    if tags != len(sample.images):
        raise SampleError(
            sample.id, "image_tag_mismatch",
            f"has {tags} {image_token} tag(s) but {len(sample.images)} image(s); "
            f"put one {image_token} in the text for each image.",
        )
    for image in sample.images:
        if isinstance(image, str) and Path(image).is_dir():
            raise SampleError(sample.id, "missing_image", f"image path '{image}' is a folder, not an image file.")
        if isinstance(image, str) and not Path(image).is_file():
            raise SampleError(
                sample.id, "missing_image", f"image file '{image}' does not exist (check data.image_root)."
            )


def load_images(sample: Sample, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """Decode every image of a sample as RGB; any image that cannot be used is a `SampleError` naming it.

    Decoding is third-party code on untrusted bytes, so every failure (not only the expected ones) becomes
    a skipped sample rather than a dead run. The declared size is checked before any pixel is decoded."""
    return [_read_image(image, max_pixels, sample.id, decode=True) for image in sample.images]


def probe_images(sample: Sample, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Read each image's header only (no pixel decoding): missing, unidentifiable and oversized images
    are found up front, which is how `data.strict` stops before step 1 rather than mid-run."""
    for image in sample.images:
        _read_image(image, max_pixels, sample.id, decode=False)


def _read_image(image: Any, max_pixels: int | None, sample_id: str, decode: bool) -> Image.Image | None:
    what = f"image file '{image}'" if isinstance(image, str) else f"image {_describe(image)}"
    try:
        return _open_checked(image, max_pixels, sample_id, what, decode)
    except SampleError:
        raise
    except FileNotFoundError:
        raise SampleError(sample_id, "missing_image", f"{what} does not exist.") from None
    except IsADirectoryError:
        raise SampleError(sample_id, "missing_image", f"{what} is a folder, not an image file.") from None
    except Image.DecompressionBombError as err:
        raise SampleError(sample_id, "image_too_large", f"{what} is too large to decode safely ({err}); "
                          "downscale it or raise data.max_image_pixels.") from None
    except MemoryError:
        raise SampleError(sample_id, "image_too_large", f"{what} does not fit in memory when decoded.") from None
    except Exception as err:  # noqa: BLE001 - see load_images
        raise SampleError(
            sample_id, "corrupt_image", f"{what} cannot be decoded ({type(err).__name__}: {err})."
        ) from None


def _open_checked(
    image: Any, max_pixels: int | None, sample_id: str, what: str, decode: bool,
) -> Image.Image | None:
    """Open lazily (header only), refuse a declared size over `max_pixels`, then (if `decode`) decode to RGB."""
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, sample_id, what)
        return _to_rgb(image) if decode else None
    if hasattr(image, "encoded"):  # a dataset cell (DatasetImage): its bytes or path, not yet decoded
        image = image.encoded()
    with _pillow_limit(max_pixels), Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        _check_pixels(opened.size, max_pixels, sample_id, what)
        return _to_rgb(opened) if decode else None


def _check_pixels(size: tuple[int, int], max_pixels: int | None, sample_id: str, what: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise SampleError(sample_id, "corrupt_image", f"{what} declares an empty size {width}x{height}.")
    if max_pixels is not None and width * height > max_pixels:
        raise SampleError(
            sample_id, "image_too_large",
            f"{what} declares {width}x{height} = {width * height:,} pixels, over data.max_image_pixels="
            f"{max_pixels:,}; downscale it or raise data.max_image_pixels.",
        )


_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Pillow refuses images over twice its own global limit. A configured limit above Pillow's (or none)
    is ours to enforce: lift Pillow's around this one decode, under a lock, and restore it after."""
    if max_pixels is not None and (Image.MAX_IMAGE_PIXELS is None or max_pixels <= Image.MAX_IMAGE_PIXELS):
        yield
        return
    with _LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the encoder. 16/32-bit integer images are scaled to 8 bits first: Pillow's own
    conversion clips them, which turns most 16-bit photos white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))  # 2-D uint8: mode L
    return image.convert("RGB")


def _describe(image: object) -> str:
    return f"({len(image)} bytes)" if isinstance(image, bytes) else repr(image)
