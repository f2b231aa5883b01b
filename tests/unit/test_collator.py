"""vlm/data/collator.py: a batch whose every sample failed to load still yields model inputs when a stand-in
is given (sharded training and evaluation), weighing nothing; without one (predict, serving) it has none."""

import pytest
import torch

from vlm.data.batch import Batch
from vlm.data.collator import Collator
from vlm.data.packing import PackingCollator
from vlm.loss import IGNORE_INDEX, count_supervised

pytestmark = pytest.mark.unit

BAD = [{"skipped": "eval-0", "category": "corrupt_image", "detail": "cannot be decoded"},
       {"skipped": "eval-2", "category": "corrupt_image", "detail": "cannot be decoded"}]


def _item(sample_id: str, n: int) -> dict:
    ids = torch.arange(1, n + 1)
    return {"id": sample_id, "input_ids": ids, "labels": ids.clone(), "pixel_values": torch.ones(1, 3, 2, 2)}


@pytest.mark.parametrize("collator", [Collator, lambda pad, side, fallback: PackingCollator(pad, 16, None, fallback)])
def test_an_unreadable_batch_becomes_the_stand_in_at_weight_zero(collator):
    stand_in = _item("train-7", 5)
    batch = collator(0, "right", stand_in)(BAD)
    assert batch.ids == [] and batch.skipped == BAD
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5]] and batch.pixel_values.shape == (1, 3, 2, 2)
    assert (batch.labels == IGNORE_INDEX).all() and count_supervised(batch.labels) == 0
    assert stand_in["labels"].tolist() == [1, 2, 3, 4, 5]  # the stand-in item itself is untouched
    # A batch with one readable sample is that sample, whatever the stand-in.
    mixed = collator(0, "right", stand_in)([BAD[0], _item("eval-1", 3)])
    assert mixed.ids == ["eval-1"] and count_supervised(mixed.labels) == 2


def test_without_a_stand_in_an_unreadable_batch_has_no_inputs():
    batch = Collator(0, "left")(BAD)
    assert batch == Batch(ids=[], skipped=BAD) and not batch.has_inputs and batch.model_inputs() == {}
