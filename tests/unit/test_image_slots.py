"""vlm/image_slots.py: which image each position sees, and the placeholder image of text-only batches."""

import pytest
import torch

from vlm.image_slots import (
    check_markers, image_index, image_offsets, is_placeholder, slot_in_sample, with_placeholder,
)


def test_each_position_sees_its_samples_most_recent_image():
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert slot_in_sample(mask).tolist() == [[-1, 0, 0, 1, 1], [-1] * 5, [0] * 5]
    counts = check_markers(mask, 3)
    assert image_offsets(counts).tolist() == [0, 2, 2]
    assert image_index(mask).tolist() == [[-1, 0, 0, 1, 1], [-1] * 5, [2] * 5]
    with pytest.raises(ValueError, match="3 image marker"):
        check_markers(mask, 2)


def test_placeholder_is_one_image_without_any_marker():
    assert is_placeholder(0, 1)
    assert not is_placeholder(0, 2) and not is_placeholder(1, 1)

    class Tower:
        num_patches, hidden_size, image_size = 4, 8, (16, 12)

    text_only = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert with_placeholder(text_only, Tower(), cached=False)["pixel_values"].shape == (1, 3, 16, 12)
    assert with_placeholder(text_only, Tower(), cached=True)["image_features"].shape == (1, 4, 8)
    with_images = {**text_only, "pixel_values": torch.ones(1, 3, 16, 12)}
    assert with_placeholder(with_images, Tower(), cached=False) is with_images
