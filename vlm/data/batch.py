"""`Batch`: what the collator hands over, one typed record instead of a dict of optional keys.

Shapes: rows = samples (or, packed, rows of several samples), seq = the longest row. Images are one
list in sample order ([num_images, ...]; with tiling, every image's views). `model_inputs()` is what
`VLM.forward` takes; the rest (ids, skipped samples, rows) is for the loop and the tools.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..image_positions import with_placeholder
from ..loss import count_supervised

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "image_seen", "pixel_values",
              "image_features", "image_grids")
"""The tensors `VLM.forward` takes from a batch, by its keyword names."""


@dataclass
class Batch:
    """ids: the loaded samples, in row order; skipped: `{"skipped": id, "category", "detail"}` per sample that
    failed to load. input_ids / attention_mask / labels [rows, seq]; image_seen [rows, seq]: the image each
    position shows or follows, offset into the batch's image list (-1: none; vlm/image_positions.py; None
    for items built without it); position_ids [rows, seq] and samples_per_row in packed batches only;
    pixel_values [num_images, 3, H, W] or image_features [num_images, patches, dim] (feature cache), with
    tiling every view and image_grids [num_images, 2]. No tensor at all: every sample failed to load."""

    ids: list[str]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    image_seen: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    samples_per_row: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    image_grids: torch.Tensor | None = None
    pairs: bool = False
    """Preference pairs: rows [chosen..., rejected...] (2 x len(ids)); the images are given once, for the
    chosen rows, and the rejected rows read them again (`image_repeats=2` in `model_inputs`)."""

    @property
    def has_inputs(self) -> bool:
        """False when every sample failed to load and no stand-in was given (nothing to run)."""
        return self.input_ids is not None

    def model_inputs(self) -> dict[str, Any]:
        """The keywords `VLM.forward` takes, the unset ones left out."""
        inputs: dict[str, Any] = {key: getattr(self, key) for key in MODEL_KEYS if getattr(self, key) is not None}
        if self.pairs:
            inputs["image_repeats"] = 2
        return inputs

    def generation_inputs(self) -> dict[str, Any]:
        """The keywords `VLM.generate` takes (the prompt and its images; the ids name a sample in an error)."""
        inputs: dict[str, Any] = {k: v for k, v in self.model_inputs().items() if k not in ("labels", "position_ids")}
        return {**inputs, "sample_ids": self.ids}

    def forward_inputs(self, vision: Any, cached: bool, device: torch.device) -> dict[str, Any]:
        """`model_inputs` on `device`; a text-only batch gets the tower's placeholder image, flagged
        (vlm/image_positions.py), so every rank's forward reaches the same weights."""
        inputs = with_placeholder(self.model_inputs(), vision, cached)
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def supervised_tokens(self) -> int:
        """Tokens the loss reads (vlm/loss.py); 0 for a batch of only evaluation stand-ins."""
        return count_supervised(self.labels) if self.labels is not None else 0

    def replace(self, **changes: Any) -> "Batch":
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> "Batch":
        """For DataLoader(pin_memory=True): pin every tensor."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)
            if torch.is_tensor(getattr(self, f.name))
        })
