"""Tiling end to end: every fusion fills (or reads) exactly the positions the processor laid out, trains,
and a saved folder tiles the same way; a mismatch names the sample; data check counts tiled totals."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from vlm.config import DataConfig, TilingConfig
from vlm.data.check import check_data
from vlm.data.collator import Collator
from vlm.data.sample import Sample
from vlm.factory import load, processor_for, save
from vlm.hub.export import ExportError, export_llava_hf
from vlm.model import VLM
from vlm.processor import VLMProcessor
from vlm.tiling import image_positions, num_views

STRATEGIES = {
    "projector": dict(type="mlp2x_gelu"),
    "pixel_shuffle": dict(type="pixel_shuffle"),
    "resampler": dict(latents=4),
    "early": {},
    "cross_attention": dict(every_n_layers=1),
    "late": dict(combine="product"),
}
SIZES = {"wide": (128, 64), "tall": (64, 128), "square": (128, 128), "small": (40, 40)}  # grids 1x2, 2x1, 2x2, 1x1
GRIDS = {"wide": (1, 2), "tall": (2, 1), "square": (2, 2), "small": (1, 1)}


def _image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def _samples() -> list[Sample]:
    def qa(name: str, colour: tuple[int, int, int], answer: str) -> Sample:
        return Sample(name, [{"role": "user", "content": "<image>\nWhat colour is it?"},
                             {"role": "assistant", "content": answer}], [_image(SIZES[name], colour)])

    return [qa("wide", (220, 30, 30), "red"), qa("square", (30, 70, 230), "blue"),
            Sample("text", [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]),
            qa("tall", (30, 170, 50), "green"), qa("small", (240, 215, 20), "yellow")]


def _build(model_config, name: str) -> VLM:
    fusion = "projector" if name == "pixel_shuffle" else name
    torch.manual_seed(0)
    return VLM.from_config(model_config.with_fusion(fusion, **STRATEGIES[name]))


def _tiled(model: VLM, data: DataConfig | None = None, max_tiles: int = 4) -> VLMProcessor:
    """The processor of a run with data.tiling.max_tiles (the tiling is the processor's, saved with it)."""
    return processor_for(model, data, max_tiles)


def _open_gates(model: VLM, name: str) -> None:
    """Let the vision path weigh in from the start (cross_attention's gates and late's mixing start closed)."""
    with torch.no_grad():
        if name == "cross_attention":
            for block in model.fusion.blocks.values():
                block.attn_gate.fill_(1.0)
        if name == "late":
            model.fusion.gate.bias.fill_(2.0)


def _forward(model: VLM, batch: dict):
    return model(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels,
                 full_logits=True, image_grids=batch.image_grids)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_fills_exactly_the_positions_laid_out_and_trains(model_config, name):
    model = _build(model_config, name)
    processor = _tiled(model)
    plain = VLMProcessor(processor.tokenizer, processor.image_transform, processor.image_token,
                         processor.tokens_per_image)
    tokens, image_id = model.fusion.tokens_per_image, model.image_token_id
    items = [processor(sample) for sample in _samples()]
    for sample, item in zip(_samples(), items):
        if not sample.images:
            assert item.get("image_grids") is None and item["pixel_values"] is None
            continue
        grid, size = GRIDS[sample.id], SIZES[sample.id]
        assert item["image_grids"].tolist() == [list(grid)]
        assert item["pixel_values"].shape[0] == num_views(grid)
        assert int((item["input_ids"] == image_id).sum()) == image_positions(grid, tokens)
        # The count is known from the size alone and is exactly what the text grew by.
        grown = len(item["input_ids"]) - len(plain(sample)["input_ids"])
        assert grown == processor.image_tokens(*size) - (tokens or 1)

    batch = Collator(model.tokenizer.pad_token_id)(items)
    assert batch.image_grids.tolist() == [[1, 2], [2, 2], [2, 1], [1, 1]]
    out = _forward(model, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(float(p.grad.abs().sum()) > 0 for p in model.fusion.parameters() if p.grad is not None)

    # Padding views (cross_attention / late group an image's views with a mask) never leak: each sample
    # alone gives the logits it gets in the batch.
    model.eval()
    _open_gates(model, name)
    with torch.no_grad():
        logits = _forward(model, batch).logits
        for row in (0, 3):
            alone = _forward(model, Collator(model.tokenizer.pad_token_id)([items[row]])).logits[0]
            assert torch.allclose(logits[row, : alone.shape[0]], alone, atol=1e-5), row


@pytest.mark.parametrize("name", ["cross_attention", "late"])
def test_strategies_without_positions_read_every_tile(model_config, name):
    """Changing one tile of the image (not the thumbnail) changes the answer's logits."""
    model = _build(model_config, name).eval()
    processor = _tiled(model)
    _open_gates(model, name)
    with torch.no_grad():
        batch = Collator(model.tokenizer.pad_token_id, "left")([processor(_samples()[1], for_generation=True)])
        base = model(batch.input_ids, batch.attention_mask, batch.pixel_values,
                     image_grids=batch.image_grids).logits[0, -1]
        pixels = batch.pixel_values.clone()
        pixels[4] = -pixels[4]  # the last tile (bottom right)
        moved = model(batch.input_ids, batch.attention_mask, pixels, image_grids=batch.image_grids).logits[0, -1]
        assert not torch.allclose(base, moved)
        # Decoding reads the tiles as the forward pass does: its first greedy token is each one's argmax.
        for pixel_values, logits in ((batch.pixel_values, base), (pixels, moved)):
            first = processor.decode(model.generate(**batch.replace(pixel_values=pixel_values).generation_inputs(),
                                                    max_new_tokens=1))
            assert first == [model.tokenizer.decode([int(logits.argmax())], skip_special_tokens=True).strip()]


def test_a_mismatched_count_names_the_sample(model_config):
    model = _build(model_config, "projector").eval()
    batch = Collator(model.tokenizer.pad_token_id, "left")(
        [_tiled(model)(s, for_generation=True) for s in _samples()[:2]]
    )
    batch.image_grids = torch.tensor([[1, 2], [1, 2]])  # the square image claims fewer tiles than its text has
    with pytest.raises(ValueError, match="sample 'square' has"):
        model.generate(**batch.generation_inputs(), max_new_tokens=2)
    with pytest.raises(ValueError, match="batch row 1 has"):
        model(batch.input_ids, batch.attention_mask, batch.pixel_values, image_grids=batch.image_grids)


def test_saved_folder_tiles_the_same_way_and_off_is_unchanged(model_config, tmp_path):
    model = _build(model_config, "projector")
    save(model, _tiled(model), tmp_path / "tiled")
    meta = json.loads((tmp_path / "tiled" / "processor_config.json").read_text())
    assert meta["tiling"] == {"max_tiles": 4, "tile_size": [64, 64]}
    assert "tiling" not in json.loads((tmp_path / "tiled" / "config.json").read_text())  # the model's file
    sample = _samples()[1]
    expected = _tiled(model)(sample)
    for processor in (VLMProcessor.from_pretrained(tmp_path / "tiled"), load(tmp_path / "tiled")[1]):
        got = processor(sample)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["image_grids"], expected["image_grids"])

    with pytest.raises(ExportError, match="data.tiling.max_tiles=4"):
        export_llava_hf(model, _tiled(model), tmp_path / "llava")

    save(model, _tiled(model, max_tiles=0), tmp_path / "off")
    assert "tiling" not in json.loads((tmp_path / "off" / "config.json").read_text())
    assert not (tmp_path / "off" / "processor_config.json").exists()
    # A run may tile from an untiled folder (model.init_from): the tile size then comes from its transform.
    retiled = VLMProcessor.from_pretrained(tmp_path / "off", max_tiles=4)(sample)
    assert torch.equal(retiled["input_ids"], expected["input_ids"])
    assert torch.equal(retiled["pixel_values"], expected["pixel_values"])
    for max_tiles in (0, 1):  # one tile is the thumbnail alone: exactly no tiling
        item = _tiled(model, max_tiles=max_tiles)(sample)
        assert set(item) == {"id", "input_ids", "labels", "image_seen", "pixel_values"} and item["pixel_values"].shape[0] == 1

    # A folder saved before the processor wrote processor_config.json kept the tiling in config.json: it still tiles.
    old = tmp_path / "tiled"
    meta = json.loads((old / "config.json").read_text())
    meta["tiling"] = json.loads((old / "processor_config.json").read_text())["tiling"]
    (old / "config.json").write_text(json.dumps(meta))
    (old / "processor_config.json").unlink()
    for processor in (VLMProcessor.from_pretrained(old), load(old)[1]):
        assert torch.equal(processor(sample)["pixel_values"], expected["pixel_values"])


def test_data_check_and_max_length_count_the_tiled_total(model_config, tmp_path):
    model = _build(model_config, "projector")
    _image(SIZES["square"], (30, 70, 230)).save(tmp_path / "big.png")
    record = {"id": "big", "image": "big.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "blue"}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    tiled = _tiled(model, DataConfig(max_length=200))
    plain = _tiled(model, DataConfig(max_length=200), max_tiles=0)
    short = check_data([tmp_path / "data.json"], plain)
    assert not short.failed and short.lengths[0] < 200
    report = check_data([tmp_path / "data.json"], tiled)
    assert report.problems["too_long"] == ["big"]
    assert "over data.max_length=200" in report.details["too_long"]
    wide_open = check_data([tmp_path / "data.json"], _tiled(model, DataConfig(max_length=4096)))
    assert wide_open.lengths == [short.lengths[0] + tiled.image_tokens(128, 128) - tiled.tokens_per_image]
    assert DataConfig(tiling=TilingConfig(4)).tiling.max_tiles == 4


@pytest.mark.parametrize("name", ["projector", "cross_attention", "late"])
def test_packed_rows_keep_each_samples_tiles(model_config, name):
    """data.packing concatenates samples: their views and grids travel in row order, and each sample's
    logits in the packed row are its logits alone."""
    from vlm.data.packing import PackingCollator

    model = _build(model_config, name).eval()
    processor = _tiled(model)
    _open_gates(model, name)
    with torch.no_grad():
        items = {item["id"]: item for item in (processor(s) for s in _samples())}
        lengths = sum(len(item["input_ids"]) for item in items.values())
        packed = PackingCollator(model.tokenizer.pad_token_id, max_length=lengths)(list(items.values()))
        assert packed.input_ids.shape[0] == 1
        grids = [items[i]["image_grids"] for i in packed.ids if items[i].get("image_grids") is not None]
        assert torch.equal(packed.image_grids, torch.cat(grids))
        row = model(packed.input_ids, packed.attention_mask, packed.pixel_values,
                    position_ids=packed.position_ids, image_grids=packed.image_grids,
                    image_seen=packed.image_seen, full_logits=True).logits[0]
        start = 0
        for sample_id in packed.ids:
            alone = _forward(model, Collator(model.tokenizer.pad_token_id)([items[sample_id]])).logits[0]
            assert torch.allclose(row[start : start + alone.shape[0]], alone, atol=1e-4), sample_id
            start += alone.shape[0]
