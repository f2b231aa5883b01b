"""vlm/data/collator.py: failed samples are reported in `Batch.skipped`, alone or beside the sample that replaced
them; a batch of only reports (predict, serving) has no inputs."""

import pytest
import torch

from vlm.data.batch import Batch
from vlm.data.collator import Collator
from vlm.data.packing import PackingCollator
from vlm.loss import count_supervised

pytestmark = pytest.mark.unit

BAD = [{"skipped": "eval-0", "category": "corrupt_image", "detail": "cannot be decoded"},
       {"skipped": "eval-2", "category": "corrupt_image", "detail": "cannot be decoded"}]


def _item(sample_id: str, n: int) -> dict:
    ids = torch.arange(1, n + 1)
    return {"id": sample_id, "input_ids": ids, "labels": ids.clone(), "pixel_values": torch.ones(1, 3, 2, 2)}


@pytest.mark.parametrize("collator", [Collator, lambda pad, side: PackingCollator(pad, 16, None)])
def test_a_replaced_samples_report_is_in_skipped_beside_its_replacement(collator):
    """The training / eval datasets put another sample in an unreadable one's place (vlm/data/dataset.py):
    the batch runs that sample and still reports the failed one."""
    replacement = {**_item("train-7", 5), "replaced": [BAD[0]]}
    batch = collator(0, "right")([replacement, _item("train-8", 3)])
    assert batch.skipped == [BAD[0]] and sorted(batch.ids) == ["train-7", "train-8"]
    assert count_supervised(batch.labels) == 4 + 2


def test_a_batch_of_only_reports_has_no_inputs():
    batch = Collator(0, "left")(BAD)
    assert batch == Batch(ids=[], skipped=BAD) and not batch.has_inputs and batch.model_inputs() == {}
