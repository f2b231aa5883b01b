"""Which image each text position sees, and the placeholder image of a text-only batch: one home.

A batch holds `input_ids` [batch, seq] and its images as one list [num_images, ...] in sample order.
`image_mask` [batch, seq] is True at image-token positions; strategies that occupy no positions
(tokens_per_image == 0) keep one marker token per image, so the mask then counts images.

A text-only training batch gets one placeholder image with no marker at all (`with_placeholder`):
every rank then runs the vision path and the fusion every step (matching collectives, no unused
parameters), and the fusion makes it contribute exactly zero (`is_placeholder`).
"""

from __future__ import annotations

from typing import Any

import torch

from .encoders import VisionEncoder
from .packed import sample_starts


def is_placeholder(num_markers: int, num_images: int) -> bool:
    """True for the trainer's placeholder: one image and no image token anywhere in the batch."""
    return num_markers == 0 and num_images == 1


def with_placeholder(inputs: dict[str, Any], vision: VisionEncoder, cached: bool) -> dict[str, Any]:
    """Model inputs of a text-only batch plus the placeholder: pixel_values [1, 3, H, W] of zeros, or with
    the feature cache (`cached`) image_features [1, num_patches, hidden] of zeros. Other batches unchanged."""
    if inputs.get("pixel_values") is not None or inputs.get("image_features") is not None:
        return inputs
    if cached:
        return {**inputs, "image_features": torch.zeros(1, vision.num_patches, vision.hidden_size)}
    return {**inputs, "pixel_values": torch.zeros(1, 3, *vision.image_size)}


def check_markers(image_mask: torch.Tensor, num_images: int) -> torch.Tensor:
    """One marker per image (tokens_per_image == 0): image_mask [batch, seq] -> markers per sample [batch];
    a mismatch with the image list is an error naming both counts."""
    counts = image_mask.sum(1)
    if int(counts.sum()) != num_images:
        raise ValueError(
            f"The batch has {int(counts.sum())} image marker(s) but {num_images} image(s); the text and the "
            "images do not match."
        )
    return counts


def image_offsets(counts: torch.Tensor) -> torch.Tensor:
    """Images per sample [batch] -> index of each sample's first image in the batch's image list [batch]."""
    return counts.cumsum(0) - counts


def slot_in_sample(image_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """image_mask [batch, seq] (one marker per image) -> [batch, seq]: which of its row's images each
    position sees (the most recent at or before it, counted from 0), -1 before its sample's first image.

    position_ids [batch, seq] of a packed batch (vlm/packed.py): a row holds several samples, and a
    position never sees an image of an earlier sample in its row."""
    seen = image_mask.long().cumsum(1)  # markers at or before each position, in the row
    if position_ids is None:
        return seen - 1
    # Markers before the sample's first position (non-decreasing along the row, so cummax carries it on).
    before = torch.where(sample_starts(position_ids), seen - image_mask.long(), 0).cummax(1).values
    return torch.where(seen > before, seen - 1, -1)


def image_index(image_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """image_mask [batch, seq] (one marker per image) -> [batch, seq]: the index in the batch's image list
    of the image each position sees, -1 before its sample's first image (packed rows: as `slot_in_sample`)."""
    slot = slot_in_sample(image_mask, position_ids)
    return torch.where(slot >= 0, image_offsets(image_mask.sum(1)).unsqueeze(1) + slot, -1)
