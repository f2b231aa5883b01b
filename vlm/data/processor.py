"""Sample -> model inputs: chat template, supervised-token mask, image-token expansion, pixels.

The label mask comes from the chat template itself: each assistant turn's span is located
by rendering the conversation up to that turn (with and without the reply) and mapping those
character offsets to tokens through the tokenizer's offset mapping. Nothing here knows what
a particular template's role markers look like.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from ..encoders import ImageTransform
from .sample import ROLES, Sample, SampleError

IGNORE_INDEX = -100


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
    ) -> None:
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.tokens_per_image = tokens_per_image
        self.max_length = max_length
        self.truncate_text = truncate_text
        """Over-long samples: cut the text after the last image token (True) or reject them (False)."""

    def __call__(self, sample: Sample, for_generation: bool = False, with_pixels: bool = True) -> dict[str, Any]:
        """Returns input_ids [seq], labels [seq], pixel_values [num_images, 3, H, W] or None, id.

        for_generation: encode only the prompt (up to the last user turn) plus the
        generation prompt, for `predict` / `generate`.
        with_pixels=False skips image decoding (the caller supplies cached features).
        """
        self.check(sample)
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

    def check(self, sample: Sample) -> None:
        check_sample(sample, self.image_token)

    def load_images(self, sample: Sample) -> list[Image.Image]:
        return load_images(sample)

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


def check_sample(sample: Sample, image_token: str) -> None:
    """Structural checks that need no image decoding; raise `SampleError` naming the sample."""
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
    tags = sum(m["content"].count(image_token) for m in sample.messages)
    if tags != len(sample.images):
        raise SampleError(
            sample.id, "image_tag_mismatch",
            f"has {tags} {image_token} tag(s) but {len(sample.images)} image(s); "
            f"put one {image_token} in the text for each image.",
        )
    for image in sample.images:
        if isinstance(image, str) and not Path(image).is_file():
            raise SampleError(
                sample.id, "missing_image", f"image file '{image}' does not exist (check data.image_root)."
            )


def load_images(sample: Sample) -> list[Image.Image]:
    """Decode every image of a sample; a missing or undecodable file is a `SampleError`."""
    images = []
    for image in sample.images:
        if isinstance(image, Image.Image):
            images.append(image.convert("RGB"))
            continue
        try:
            if hasattr(image, "load") and not isinstance(image, (str, bytes)):  # a dataset cell (DatasetImage)
                images.append(image.load().convert("RGB"))
                continue
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
                images.append(opened.convert("RGB"))
        except FileNotFoundError:
            raise SampleError(sample.id, "missing_image", f"image file '{image}' does not exist.") from None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            what = f"image file '{image}'" if isinstance(image, str) else f"image {_describe(image)}"
            raise SampleError(sample.id, "corrupt_image", f"{what} cannot be decoded ({err}).") from None
    return images


def _describe(image: object) -> str:
    return f"({len(image)} bytes)" if isinstance(image, bytes) else repr(image)
