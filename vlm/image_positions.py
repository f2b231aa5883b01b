"""Where a batch's images sit in its text: what the strategies that occupy no positions read.

The processor knows, as it expands each `<image>`, which image every position shows or follows
(`image_seen`, vlm/processor.py); the collator offsets those indices into the batch's image list,
row by row and, in packed rows, sample by sample (vlm/data/collator.py). So a position never sees an
image of an earlier sample in its row, by construction: nothing here reads `position_ids`.

A batch holds `input_ids` [rows, seq] and its images as one list [num_images, ...] in sample order.
Cross-attention and late fusion keep one marker token per image (tokens_per_image == 0) and read
`ImagePositions`; strategies that fill positions need only the image-token mask (vlm/model.py).

A text-only training batch gets one placeholder image (`with_placeholder`), flagged as such:
every rank then runs the vision path and the fusion every step (matching collectives, no unused
parameters), and the fusion makes it contribute exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .encoders import VisionEncoder

PLACEHOLDER_KEY = "image_placeholder"
"""Model-input key (a bool) that flags the placeholder image of a text-only training batch."""


@dataclass(frozen=True)
class ImagePositions:
    """markers [rows, seq] bool: each image's marker token; seen [rows, seq] long: index in the batch's
    image list of the image each position shows or follows within its own sample (-1: none yet);
    views [num_images]: with tiling, how many consecutive feature rows (thumbnail, then tiles) belong
    to each image (None: one each); placeholder: the batch's one image is the trainer's stand-in."""

    markers: torch.Tensor
    seen: torch.Tensor
    views: torch.Tensor | None = None
    placeholder: bool = False

    @classmethod
    def of_batch(
        cls, markers: torch.Tensor, image_seen: torch.Tensor | None = None, packed: bool = False,
        views: torch.Tensor | None = None, placeholder: bool = False,
    ) -> "ImagePositions":
        """From the collator's `image_seen`; without it (tensors built by hand, one sample per row) from the
        markers alone, one per image. A packed row cannot be read that way: the collator's is required."""
        if placeholder:
            return cls(markers, torch.full_like(markers, -1, dtype=torch.long), views, True)
        if image_seen is None:
            if packed:
                raise ValueError("A packed batch needs the collator's `image_seen` (which sample's image each "
                                 "position sees); build it with vlm.data.packing.PackingCollator.")
            counts = markers.sum(1)
            local = markers.long().cumsum(1) - 1
            image_seen = torch.where(local >= 0, local + (counts.cumsum(0) - counts).unsqueeze(1), -1)
        return cls(markers, image_seen.to(markers.device), views, False)

    def to(self, device: torch.device) -> "ImagePositions":
        views = None if self.views is None else self.views.to(device)
        return replace(self, markers=self.markers.to(device), seen=self.seen.to(device), views=views)

    def first_in_row(self) -> torch.Tensor:
        """[rows]: index of each row's first image in the image list (rows are consecutive in it)."""
        big = torch.iinfo(torch.long).max
        return torch.where(self.seen >= 0, self.seen, big).min(1).values

    def per_row(self) -> torch.Tensor:
        """[rows]: images in each row (every image has a marker, whose `seen` is that image)."""
        last = self.seen.max(1).values
        return torch.where(last >= 0, last - self.first_in_row() + 1, 0)

    def slot_in_row(self) -> torch.Tensor:
        """[rows, seq]: which of its row's images each position sees, from 0; -1 none."""
        return torch.where(self.seen >= 0, self.seen - self.first_in_row().unsqueeze(1), -1)

    def check(self, num_images: int) -> None:
        """The text's images against the image list: a mismatch is an error naming both counts."""
        have = int(self.per_row().sum())
        if have != num_images or int(self.markers.sum()) != have:
            raise ValueError(
                f"The batch has {int(self.markers.sum())} image marker(s) but {num_images} image(s); the text and "
                "the images do not match."
            )


def with_placeholder(inputs: dict[str, Any], vision: VisionEncoder, cached: bool) -> dict[str, Any]:
    """Model inputs of a text-only batch plus the placeholder, flagged: pixel_values [1, 3, H, W] of zeros, or
    with the feature cache (`cached`) image_features [1, num_patches, hidden] of zeros. Other batches unchanged."""
    if inputs.get("pixel_values") is not None or inputs.get("image_features") is not None:
        return inputs
    if cached:
        return {**inputs, "image_features": torch.zeros(1, vision.num_patches, vision.hidden_size),
                PLACEHOLDER_KEY: True}
    return {**inputs, "pixel_values": torch.zeros(1, 3, *vision.image_size), PLACEHOLDER_KEY: True}
