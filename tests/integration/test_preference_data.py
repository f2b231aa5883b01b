"""Preference pairs (TRL's format) through the project's readers, checks, processor and collator, and the
model's one image encoding per pair, for every fusion."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from PIL import Image

from vlm.cli import main
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import processor_for
from vlm.model import VLM

FUSIONS = {
    "projector": {},
    "resampler": {"latents": 4},
    "early": {},
    "cross_attention": {"every_n_layers": 2},
    "late": {},
}


def _images(root):
    Image.new("RGB", (64, 64), (200, 20, 20)).save(root / "red.png")
    Image.new("RGB", (64, 64), (20, 20, 200)).save(root / "blue.png")


STANDARD = [
    {"id": "s1", "image": "red.png", "prompt": "What colour is it?", "chosen": "red", "rejected": "It is red, surely."},
    {"id": "s2", "image": "blue.png", "prompt": "<image>\nColour?", "chosen": "blue", "rejected": "green"},
]
CONVERSATIONAL = [{
    "id": "c1", "images": ["blue.png"],
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}],
    "chosen": [{"role": "assistant", "content": "blue"}],
    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
}]


def test_standard_conversational_jsonl_and_datasets_read_as_pairs(tmp_path):
    _images(tmp_path)
    (tmp_path / "std.json").write_text(json.dumps(STANDARD))
    (tmp_path / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in CONVERSATIONAL))
    rows = [{**r, "image": str(tmp_path / r["image"])} for r in STANDARD]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "std.parquet"))
    std, errors = read_samples(tmp_path / "std.json")
    assert not errors
    assert std[0].messages == [{"role": "user", "content": "<image>\nWhat colour is it?"},
                               {"role": "assistant", "content": "red"}]  # a tag added for the image, as VQA rows
    assert std[0].rejected == "It is red, surely." and std[0].source_format == "preference"
    assert std[1].messages[0]["content"] == "<image>\nColour?"  # its own tag kept, none added
    conv, errors = read_samples(tmp_path / "conv.jsonl")
    assert not errors
    assert conv[0].messages == [{"role": "user", "content": "<image>\nWhat colour is it?"},
                                {"role": "assistant", "content": "blue"}] and conv[0].rejected == "red"
    table, errors = read_samples(tmp_path / "std.parquet")
    assert not errors and [s.rejected for s in table] == [s.rejected for s in std]
    assert [s.messages for s in table] == [s.messages for s in std]


def test_data_check_names_and_counts_each_bad_pair(tmp_path, backbones, capsys):
    _images(tmp_path)
    records = [
        *STANDARD,
        {"id": "same", "image": "red.png", "prompt": "Colour?", "chosen": "red", "rejected": " red "},
        {"id": "empty", "image": "red.png", "prompt": "Colour?", "chosen": "red", "rejected": ""},
        {"id": "gone", "image": "nope.png", "prompt": "Colour?", "chosen": "red", "rejected": "blue"},
        {"id": "long", "image": "red.png", "prompt": "word " * 300, "chosen": "red", "rejected": "blue"},
        {"id": "half", "image": "red.png", "prompt": "Colour?", "chosen": [{"role": "user", "content": "x"}],
         "rejected": "blue"},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  vision: {backbones['vit']}\n  lm: {backbones['lm']}\ndata:\n  max_length: 200\n")
    assert main(["data", "check", str(tmp_path / "pairs.json"), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "samples: 7 (2 good, 5 bad)" in out
    assert "PROBLEM identical_pair: 1 sample(s): same" in out
    assert "PROBLEM empty_turn: 1 sample(s): empty" in out and "empty rejected reply" in out
    assert "PROBLEM missing_image: 1 sample(s): gone" in out
    assert "PROBLEM too_long: 1 sample(s): long" in out
    assert "PROBLEM malformed: 1 sample(s): half" in out and "'chosen' must be one assistant message" in out


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_a_pair_batch_encodes_each_image_once_and_scores_like_duplicated_images(model_config, fusion, tmp_path):
    """Rows [chosen..., rejected...] reading the chosen rows' images again give the logits of the same rows
    with every image given twice; the tower runs on each image once."""
    _images(tmp_path)
    (tmp_path / "std.json").write_text(json.dumps(STANDARD))
    torch.manual_seed(0)
    config = model_config.with_fusion(fusion, **FUSIONS[fusion])
    model = VLM.from_config(config).eval()
    with torch.no_grad():  # cross-attention's gates start closed (images change nothing yet): open them
        for name, param in model.fusion.named_parameters():
            if "gate" in name:
                param.fill_(1.0)
    processor = processor_for(model)
    samples, _ = read_samples(tmp_path / "std.json")
    batch = Collator(model.tokenizer.pad_token_id)([processor(s) for s in samples])
    assert batch.pairs and batch.input_ids.shape[0] == 4 and batch.pixel_values.shape[0] == 2
    assert batch.labels[2:].ne(-100).sum() > batch.labels[:2].ne(-100).sum()  # the rejected replies are longer
    encoded, encode = [], model.encode_images
    model.encode_images = lambda pixels: encoded.append(pixels.shape[0]) or encode(pixels)  # what the fusion reads
    with torch.no_grad():
        shared = model(**batch.model_inputs(), full_logits=True).logits
        assert encoded == [2]  # two images, encoded once for four rows
        doubled = {**batch.model_inputs(), "pixel_values": batch.pixel_values.repeat(2, 1, 1, 1)}
        doubled.pop("image_repeats")
        twice = model(**doubled, full_logits=True).logits
    torch.testing.assert_close(shared, twice)
    # The images matter: the rejected rows' logits change when they read the other image.
    swapped = {**doubled, "pixel_values": torch.cat([batch.pixel_values, batch.pixel_values.flip(0)])}
    with torch.no_grad():
        other = model(**swapped, full_logits=True).logits
    mask = batch.attention_mask[2:].bool()
    assert not torch.allclose(other[2:][mask], twice[2:][mask])
