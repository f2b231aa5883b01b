"""Packing (`data.packing`): every sample's logits and loss packed equal its unpacked ones, for every strategy."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm.data.collator import Collator
from vlm.data.packing import PackingCollator
from vlm.data.sample import Sample
from vlm.factory import processor_for
from vlm.loss import count_supervised
from vlm.model import VLM

VARIANTS = {
    "projector": {},
    "projector_pixel_shuffle": {"type": "pixel_shuffle"},
    "resampler": {"latents": 4},
    "cross_attention": {"every_n_layers": 1},
    "early": {},
    "late": {},
}
ATOL = 1e-5  # fp32; measured at most 2.4e-6 (printed with -s): only the matmul shapes differ


def _image(colour: tuple[int, int, int], corner: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste(colour, (corner, corner, corner + 24, corner + 24))
    return image


def _samples() -> list[Sample]:
    red, blue, green = _image((255, 0, 0), 8), _image((0, 0, 255), 30), _image((0, 255, 0), 20)

    def turns(*pairs: str) -> list[dict[str, str]]:
        return [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 3, pairs)]

    return [
        Sample("two_images", turns("<image>\nWhat colour?", "red", "<image>\nAnd now?", "blue"), [red, blue]),
        # Its image comes in the second turn: the first turn must see no image, not the previous sample's.
        Sample("late_image", turns("Ready?", "yes", "<image>\nWhat colour is it?", "green"), [green]),
        Sample("text_only", turns("Say hello.", "hello there")),
        Sample("one_image", turns("<image>\nDescribe the picture in a few words.", "a blue square on black"), [blue]),
    ]


def _model(model_config, name: str) -> VLM:
    fusion = name.split("_pixel")[0]
    torch.manual_seed(0)
    model = VLM.from_config(model_config.with_fusion(fusion, **VARIANTS[name])).eval()
    if fusion == "cross_attention":  # gates start at 0 (the base LM exactly): open them so images matter
        with torch.no_grad():
            for block in model.fusion.blocks.values():
                block.attn_gate.fill_(1.0)
                block.ffn_gate.fill_(1.0)
    return model


def _per_sample_logits(model: VLM, batch: dict, lengths: dict[str, int], **kwargs) -> dict[str, torch.Tensor]:
    """Logits of each sample's own positions, whether its batch is packed or not."""
    keys = ("input_ids", "attention_mask", "pixel_values", "labels", "position_ids", "image_seen")
    with torch.no_grad():
        logits = model(**{k: getattr(batch, k) for k in keys if getattr(batch, k) is not None}, full_logits=True, **kwargs).logits
    out, per_row = {}, batch.samples_per_row or [1] * len(batch.ids)
    ids = iter(batch.ids)
    for row, count in enumerate(per_row):
        start = 0
        for _ in range(count):
            sample_id = next(ids)
            out[sample_id] = logits[row, start : start + lengths[sample_id]]
            start += lengths[sample_id]
    return out


@pytest.mark.parametrize("how", ["mask", "position_ids"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_logits_and_loss_equal_unpacked(model_config, name, how):
    model = _model(model_config, name)
    processor = processor_for(model)
    items = [processor(s) for s in _samples()]
    lengths = {item["id"]: len(item["input_ids"]) for item in items}
    unpacked = Collator(model.tokenizer.pad_token_id)(items)
    packed = PackingCollator(model.tokenizer.pad_token_id, max_length=sum(lengths.values()))(items)
    assert packed.input_ids.shape[0] == 1 and packed.samples_per_row == [4]
    # Images travel in the packed order of their samples.
    by_id = {item["id"]: item for item in items}
    in_order = [by_id[i]["pixel_values"] for i in packed.ids if by_id[i]["pixel_values"] is not None]
    assert torch.equal(packed.pixel_values, torch.cat(in_order))
    assert packed.ids != [item["id"] for item in items]  # FFD reordered them, so the order above is tested

    expected = _per_sample_logits(model, unpacked, lengths)
    got = _per_sample_logits(model, packed, lengths, packing_attention=how)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    print(f"{name} / {how}: largest |packed - unpacked| logit difference {worst:.2e}")
    assert worst < ATOL

    # The loss, with the global-token normalisation and without it.
    total = count_supervised(unpacked.labels)
    assert count_supervised(packed.labels) == total
    keys = ("input_ids", "attention_mask", "pixel_values", "labels", "position_ids", "image_seen")
    with torch.no_grad():
        for norm in (total, None):
            a = model(**{k: getattr(unpacked, k) for k in keys if getattr(unpacked, k) is not None}, num_items_in_batch=norm).loss
            b = model(**{k: getattr(packed, k) for k in keys if getattr(packed, k) is not None}, num_items_in_batch=norm,
                      packing_attention=how).loss
            assert abs(float(a) - float(b)) < 1e-5, (float(a), float(b))


@pytest.mark.parametrize("name", ["projector", "cross_attention", "late"])
def test_without_sample_boundaries_the_packed_logits_differ(model_config, name):
    """The equality above can fail: the same packed row with plain causal attention and no position
    restarts lets samples see each other, and the per-sample logits move."""
    model = _model(model_config, name)
    processor = processor_for(model)
    items = [processor(s) for s in _samples()]
    lengths = {item["id"]: len(item["input_ids"]) for item in items}
    expected = _per_sample_logits(model, Collator(model.tokenizer.pad_token_id)(items), lengths)
    packed = PackingCollator(model.tokenizer.pad_token_id, max_length=sum(lengths.values()))(items)
    leaky = packed.replace(position_ids=None)
    got = _per_sample_logits(model, leaky, lengths)
    later = [k for k in packed.ids[1:]]  # every sample after the row's first could see an earlier one
    assert all(float((got[k] - expected[k]).abs().max()) > 1e-3 for k in later)
