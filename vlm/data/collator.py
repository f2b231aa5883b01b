"""Batches processed samples: pads text, concatenates images, reports skipped samples."""

from __future__ import annotations

from typing import Any

import torch

from ..loss import IGNORE_INDEX


class Collator:
    """Items are processor outputs, or `{"skipped": id, "category": ..., "detail": ...}` for bad samples.

    Output: input_ids / attention_mask / labels [batch, max_len]; pixel_values
    [total_images, 3, H, W] in sample order (None when no sample has an image), or
    image_features [total_images, patches, dim] from the feature cache; with tiling (vlm/tiling.py),
    pixel_values holds every image's views and image_grids [total_images, 2] their grids; ids; skipped.
    `padding_side="left"` for generation, so every prompt ends at the last position.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [item for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        batch: dict[str, Any] = {"skipped": skipped, "ids": [item["id"] for item in items]}
        if not items:
            return batch
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            cols = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = item["input_ids"]
            labels[row, cols] = item["labels"]
            attention_mask[row, cols] = 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        for key in ("pixel_values", "image_features", "image_grids"):
            parts = [item[key] for item in items if item.get(key) is not None]
            batch[key] = torch.cat(parts) if parts else None
        return batch
