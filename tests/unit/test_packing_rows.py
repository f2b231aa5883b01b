"""vlm/data/packing.py and vlm/packed_attention.py: bin-packing, packed rows, sample boundaries; modality grouping."""

import pytest
import torch

from vlm.data.batch import Batch
from vlm.data.packing import PackingCollator, first_fit_decreasing, padding_share
from vlm.data.samplers import LengthGroupedSampler
from vlm.loss import IGNORE_INDEX
from vlm.packed_attention import block_causal_mask, segment_ids

pytestmark = pytest.mark.unit


def test_first_fit_decreasing_fills_bins_longest_first_within_both_budgets():
    lengths = [5, 9, 3, 4, 6, 2]
    assert first_fit_decreasing(lengths, [0] * 6, max_length=10) == [[1], [4, 3], [0, 2, 5]]
    # One image per bin at most: the image samples (0 and 2) go to different bins.
    bins = first_fit_decreasing(lengths, [1, 0, 1, 0, 0, 0], max_length=10, max_images=1)
    assert all(sum(i in (0, 2) for i in b) <= 1 for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    with pytest.raises(ValueError, match="cannot fit one pack"):
        first_fit_decreasing([11], [0], max_length=10)
    with pytest.raises(ValueError, match="packing_max_images=1"):
        first_fit_decreasing([3], [2], max_length=10, max_images=1)


def _item(sample_id: str, n: int, images: int = 0) -> dict:
    ids = torch.arange(1, n + 1)
    return {"id": sample_id, "input_ids": ids, "labels": ids.clone(),
            "pixel_values": torch.full((images, 3, 2, 2), float(n)) if images else None}


def test_packed_rows_restart_positions_ignore_each_first_label_and_keep_image_order():
    batch = PackingCollator(pad_token_id=0, max_length=8)([_item("a", 3, 1), _item("b", 5), _item("c", 4, 2)])
    assert batch.samples_per_row == [1, 2] and batch.ids == ["b", "c", "a"]  # 5 | 4 + 3: even rows
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    assert batch.labels[1].tolist() == [IGNORE_INDEX, 2, 3, 4, IGNORE_INDEX, 2, 3]
    assert batch.labels[0, 5:].tolist() == [IGNORE_INDEX] * 2  # padding
    assert batch.attention_mask.tolist() == [[1] * 5 + [0] * 2, [1] * 7]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [4.0, 4.0, 3.0]  # c's two images, then a's
    assert padding_share(batch) == pytest.approx(2 / 14)
    assert PackingCollator(0, 8)([{"skipped": "x", "category": "c", "detail": "d"}]) == Batch(
        ids=[], skipped=[{"skipped": "x", "category": "c", "detail": "d"}])


def test_segments_and_block_causal_mask_keep_samples_apart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert segment_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2]]
    mask = block_causal_mask(positions)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]
    additive = block_causal_mask(positions, torch.float32)[0, 0]
    assert additive[4, 3] == 0 and additive[4, 2] == torch.finfo(torch.float32).min


def test_modality_grouping_never_mixes_image_and_text_batches_but_one():
    lengths = [(i * 37) % 50 + 1 for i in range(70)]
    has_image = [i % 3 != 0 for i in range(70)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, num_replicas=2, seed=1, mega_batch_mult=2,
                                   has_image=has_image)
    order = sampler.global_order()
    assert sorted(order) == list(range(70))
    batches = [order[i : i + 8] for i in range(0, 70, 8)]
    mixed = [b for b in batches if len({has_image[i] for i in b}) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is batches[-1])
    assert order == LengthGroupedSampler(lengths, 4, 2, 0, 1, 2, has_image).global_order()  # deterministic
    assert order != LengthGroupedSampler(lengths, 4, 2, 0, 2, 2, has_image).global_order()  # seeded
    # Rank r's step-k batch is its share of the k-th global batch.
    ranks = [LengthGroupedSampler(lengths, 4, 2, r, 1, 2, has_image) for r in (0, 1)]
    shares = [list(s) for s in ranks]
    assert set(shares[0][:4] + shares[1][:4]) == set(order[:8])


def test_balanced_bins_use_ffds_count_and_even_rows():
    from vlm.data.packing import balanced_bins

    lengths = [9, 8, 7, 3, 2, 1]  # FFD: [9, 1], [8, 2], [7, 3] -> 3 bins of 10
    assert len(first_fit_decreasing(lengths, [0] * 6, max_length=12)) == 3
    bins = balanced_bins(lengths, [0] * 6, max_length=12)
    assert len(bins) == 3 and sorted(i for b in bins for i in b) == list(range(6))
    assert max(sum(lengths[i] for i in b) for b in bins) == 10
    # Two bins where FFD leaves one nearly empty: 11 + 1 vs 6 + 6.
    lengths = [6, 6, 5, 5]
    assert [sum(lengths[i] for i in b) for b in first_fit_decreasing(lengths, [0] * 4, 17)] == [17, 5]
    assert sorted(sum(lengths[i] for i in b) for b in balanced_bins(lengths, [0] * 4, 17)) == [11, 11]


def test_long_tail_mix_spans_two_orders_of_magnitude(tmp_path):
    import json

    from vlm.embedded.long_tail import make_long_tail_dataset

    records = json.loads(make_long_tail_dataset(tmp_path, 300, images=4).read_text())
    turns = [len(r["conversations"]) // 2 for r in records]
    words = [len(t["value"].split()) for r in records for t in r["conversations"][1::2]]
    assert min(turns) == 1 and max(turns) == 6
    assert min(words) <= 6 and max(words) >= 150 and sorted(words)[len(words) // 2] < 60  # long-tailed
    text_only = sum("image" not in r for r in records)
    assert 5 <= text_only <= 40 and all(r["conversations"][0]["value"].startswith("<image>") for r in records
                                        if "image" in r)
