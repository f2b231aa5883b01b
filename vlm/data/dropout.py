"""Image (modality) dropout: remove a sample's images and their `<image>` tags together.

Used in training (`train.image_dropout`) so a model learns to answer with missing images, and in
evaluation (`vlm predict --image-drop`) to measure how it degrades. Each image is dropped on its
own with probability p; the answer is kept, so a sample with every image dropped is a plain
text-only sample. The draw depends only on (seed, epoch, sample index), so a resumed run or a
re-run evaluation drops exactly the same images.

Where a dropped image goes (`train.dropped_image`, `vlm predict --dropped-image`): `remove` takes out
the image and its tag, so the LM reads plain text (and a frozen LM answers as it always did);
`blank` keeps the tag and puts a blank grey image in its place, so the fusion still runs and can
learn what to do when the picture carries nothing (with a frozen LM, the only part that can learn it).

Corruption (`train.image_corruption`, ModDrop-style augmentation): each kept image is, with its own
probability, replaced by a copy corrupted by a random kind and severity of vlm/eval/corruptions.py (the
test-time corruptions), so the model meets unreliable pictures in training and can learn to lean on the
text when the picture is bad. Drawn from the same per-sample generator as the dropout.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from PIL import Image

from ..eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .images import load_image
from .sample import IMAGE_TAG, Sample

DROPPED_IMAGE_MODES = ("remove", "blank")


def check_dropped_image(mode: str, key: str = "train.dropped_image / --dropped-image") -> str:
    """`mode` if it is one of DROPPED_IMAGE_MODES, else a one-line error naming `key`."""
    if mode not in DROPPED_IMAGE_MODES:
        raise ValueError(f"{key}: unknown '{mode}'; choose from {', '.join(DROPPED_IMAGE_MODES)}.")
    return mode


def check_image_corruption(p: float, cached: bool) -> float:
    """`p` if it is a usable `train.image_corruption`, else a one-line error (a cache cannot serve corrupted pixels)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"train.image_corruption must be in [0, 1], got {p}.")
    if p > 0 and cached:
        raise ValueError("train.image_corruption changes the pixels each step, which the frozen-feature cache "
                         "cannot serve; set data.cache_features=false.")
    return p


def blank_image() -> Image.Image:
    """The stand-in for a dropped image under `blank`: uniform mid-grey, resized by the image transform."""
    return Image.new("RGB", (32, 32), (128, 128, 128))


def dropout_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose draws are a pure function of (seed, epoch, sample index)."""
    return torch.Generator().manual_seed(hash((int(seed), int(epoch), int(index))) & 0x7FFF_FFFF_FFFF_FFFF)


def drop_images(
    sample: Sample, p: float, generator: torch.Generator, image_tag: str = IMAGE_TAG, mode: str = "remove"
) -> Sample:
    """A copy of `sample` without the images drawn for dropping (each with probability p) and without
    their tags (with the newline or space that follows one). A tag that is a turn's whole text is kept
    with its image, since removing it would leave an empty turn. `mode="blank"`: every drawn image is
    replaced by `blank_image()` instead, its tag kept."""
    if p <= 0 or not sample.images:
        return sample
    drop = (torch.rand(len(sample.images), generator=generator) < p).tolist()
    if not any(drop):
        return sample
    if mode == "blank":
        images = [blank_image() if dropped else image for image, dropped in zip(sample.images, drop)]
        return dataclasses.replace(sample, images=images)
    pattern = re.compile(re.escape(image_tag) + r"[ \t]*\n?|" + re.escape(image_tag) + " ?")
    kept_images, messages, k = [], [], 0
    for message in sample.messages:
        content = message["content"]
        pieces, last = [], 0
        for match in pattern.finditer(content):
            if k < len(drop) and drop[k] and content.replace(match.group(0), "", 1).strip():
                pieces.append(content[last:match.start()])
                last = match.end()
            elif k < len(sample.images):
                kept_images.append(sample.images[k])
            k += 1
        pieces.append(content[last:])
        messages.append({**message, "content": "".join(pieces)})
    return dataclasses.replace(sample, messages=messages, images=kept_images)


def corrupt_images(sample: Sample, p: float, generator: torch.Generator, max_pixels: int | None = None) -> Sample:
    """A copy of `sample` whose images are each, with probability p, corrupted by a kind and severity
    drawn uniformly (decoded here; an unreadable image is the usual `SampleError`)."""
    if p <= 0 or not sample.images:
        return sample
    draws = torch.rand(len(sample.images), generator=generator).tolist()
    picks = torch.randint(0, 2**31 - 1, (len(sample.images), 3), generator=generator).tolist()
    if not any(u < p for u in draws):
        return sample

    def corrupted(image: object, kind: int, severity: int, seed: int) -> Image.Image:
        # Only the drawn images are decoded here; the others stay as given, decoded once by the processor.
        decoded = load_image(image, sample.id, max_pixels)
        return corrupt(decoded, CORRUPTIONS[kind % len(CORRUPTIONS)], SEVERITIES[severity % len(SEVERITIES)], seed)

    images = [corrupted(image, *pick) if u < p else image for image, u, pick in zip(sample.images, draws, picks)]
    return dataclasses.replace(sample, images=images)
