"""vlm/image_positions.py and the collator's `image_seen`: which image each position sees, and the
placeholder image of text-only batches."""

import pytest
import torch

from vlm.data.collator import Collator
from vlm.data.packing import PackingCollator
from vlm.image_positions import PLACEHOLDER_KEY, ImagePositions, with_placeholder

pytestmark = pytest.mark.unit


def _item(sample_id: str, markers: list[int]) -> dict:
    """A processed sample whose positions marked 1 are its images' markers (token 9), in order."""
    ids = torch.tensor([9 if m else 1 for m in markers])
    seen = torch.tensor(markers).cumsum(0) - 1
    images = sum(markers)
    return {"id": sample_id, "input_ids": ids, "labels": ids.clone(), "image_seen": seen,
            "pixel_values": torch.zeros(images, 3, 2, 2) if images else None}


def test_each_position_sees_its_samples_most_recent_image():
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    images = ImagePositions.of_batch(mask)  # tensors built by hand: read from the markers
    assert images.seen.tolist() == [[-1, 0, 0, 1, 1], [-1] * 5, [2] * 5]
    assert images.per_row().tolist() == [2, 0, 1]
    assert images.slot_in_row().tolist() == [[-1, 0, 0, 1, 1], [-1] * 5, [0] * 5]
    images.check(3)
    with pytest.raises(ValueError, match="3 image marker"):
        images.check(2)
    with pytest.raises(ValueError, match="packed batch needs the collator's `image_seen`"):
        ImagePositions.of_batch(mask, packed=True)


def test_the_collator_offsets_each_samples_images_into_the_batch_list():
    items = [_item("a", [0, 1, 0, 1]), _item("b", [0, 0]), _item("c", [1, 0, 0])]
    batch = Collator(0, "right")(items)
    assert batch.image_seen.tolist() == [[-1, 0, 0, 1], [-1, -1, -1, -1], [2, 2, 2, -1]]  # padding: -1
    left = Collator(0, "left")(items)
    assert left.image_seen.tolist() == [[-1, 0, 0, 1], [-1, -1, -1, -1], [-1, 2, 2, 2]]
    marked = ImagePositions.of_batch(batch.input_ids == 9, batch.image_seen)
    assert marked.per_row().tolist() == [2, 0, 1]
    hand_built = {k: v for k, v in items[0].items() if k != "image_seen"}
    assert Collator(0)([hand_built]).image_seen is None  # then the model reads the markers


def test_a_packed_sample_never_sees_the_previous_samples_image():
    # One row: a = [t, img, t, img], then c = [img, t, t] (longest first); a's first position has no image yet.
    packed = PackingCollator(0, max_length=8)([_item("c", [1, 0, 0]), _item("a", [0, 1, 0, 1])])
    assert packed.ids == ["a", "c"] and packed.samples_per_row == [2]  # longest first
    assert packed.image_seen.tolist() == [[-1, 0, 0, 1, 2, 2, 2]]
    images = ImagePositions.of_batch(packed.input_ids == 9, packed.image_seen, packed=True)
    assert images.slot_in_row().tolist() == [[-1, 0, 0, 1, 2, 2, 2]] and images.per_row().tolist() == [3]
    # The markers alone would let c's first position see a's last image; the collator's layout does not.
    c_first = 4
    assert ImagePositions.of_batch(packed.input_ids == 9).seen[0, c_first] == 2  # c's own image (index 2)
    shifted = PackingCollator(0, max_length=8)([_item("c", [0, 1, 0]), _item("a", [0, 1, 0, 1])])
    assert shifted.image_seen.tolist() == [[-1, 0, 0, 1, -1, 2, 2]]
    assert ImagePositions.of_batch(shifted.input_ids == 9).seen[0, c_first] == 1  # the leak it prevents


def test_placeholder_is_flagged_and_sees_nothing():
    class Tower:
        num_patches, hidden_size, image_size = 4, 8, (16, 12)

    text_only = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    inputs = with_placeholder(text_only, Tower(), cached=False)
    assert inputs["pixel_values"].shape == (1, 3, 16, 12) and inputs[PLACEHOLDER_KEY] is True
    assert with_placeholder(text_only, Tower(), cached=True)["image_features"].shape == (1, 4, 8)
    with_images = {**text_only, "pixel_values": torch.ones(1, 3, 16, 12)}
    assert with_placeholder(with_images, Tower(), cached=False) is with_images
    images = ImagePositions.of_batch(torch.zeros(2, 3, dtype=torch.bool), placeholder=True)
    assert images.placeholder and (images.seen == -1).all() and images.per_row().tolist() == [0, 0]
