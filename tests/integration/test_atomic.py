"""Checkpoint hygiene: a save that dies mid-write never damages or half-replaces the folder it targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import processor_for, save
from vlm.model import VLM


def _logits(model: VLM, image: Path) -> torch.Tensor:
    sample = Sample("s", [{"role": "user", "content": "<image>\nWhat is it?"}], [str(image)])
    batch = Collator(model.tokenizer.pad_token_id, "left")([processor_for(model)(sample, for_generation=True)])
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask, batch.pixel_values).logits


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("crash", [OSError("No space left on device (simulated)"), KeyboardInterrupt()])
def test_save_killed_mid_write_keeps_the_previous_checkpoint_and_leaves_no_partial_folder(
    tiny_vlm, tmp_path, monkeypatch, crash
):
    image = tmp_path / "im.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    runs = tmp_path / "run"
    target = runs / "checkpoint"
    save(tiny_vlm, processor_for(tiny_vlm), target)
    before, expected = _files(target), _logits(tiny_vlm, image)

    with torch.no_grad():  # the next save would hold different weights
        for p in tiny_vlm.fusion.parameters():
            p.add_(0.5)
    assert not torch.equal(_logits(tiny_vlm, image), expected)

    def dies_half_way(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)  # a truncated weights file, then the crash
        raise crash

    monkeypatch.setattr("vlm.model.save_model", dies_half_way)
    with pytest.raises(type(crash)):
        save(tiny_vlm, processor_for(tiny_vlm), target)
    with pytest.raises(type(crash)):
        save(tiny_vlm, processor_for(tiny_vlm), runs / "first")  # a first save that dies leaves nothing at all

    assert sorted(p.name for p in runs.iterdir()) == ["checkpoint"]  # no temporary or partial folders
    assert _files(target) == before
    assert torch.equal(_logits(VLM.from_pretrained(target), image), expected)
