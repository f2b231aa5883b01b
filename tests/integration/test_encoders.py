import json

import pytest
import timm
import torch
from PIL import Image
from transformers import CLIPModel

from vlm.encoders import load_vision_encoder
from vlm.encoders.hf_encoder import HFVisionEncoder
from vlm.encoders.timm_encoder import TimmVisionEncoder


def test_timm_folder_is_recognised_and_gives_penultimate_patch_features(backbones):
    encoder = load_vision_encoder(str(backbones["vit"]))
    assert isinstance(encoder, TimmVisionEncoder)
    reference = timm.create_model(f"local-dir:{backbones['vit']}", pretrained=True, num_classes=0).eval()
    pixels = torch.randn(2, 3, *reference.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        tokens = reference.patch_embed(pixels)
        tokens = reference._pos_embed(tokens)
        tokens = reference.norm_pre(tokens)
        for block in reference.blocks[:-1]:  # penultimate block's output
            tokens = block(tokens)
    expected = tokens[:, reference.num_prefix_tokens :]
    out = encoder(pixels)
    assert out.shape == expected.shape == (2, encoder.num_patches, encoder.hidden_size)
    torch.testing.assert_close(out, expected)
    assert len(encoder.model.blocks) == len(reference.blocks) - 1  # the unused last block is pruned


def test_timm_prefix_tokens_kept_when_asked(backbones):
    keep = load_vision_encoder(f"timm:{backbones['vit']}", drop_prefix_tokens=False)
    drop = load_vision_encoder(f"timm:{backbones['vit']}")
    assert keep.num_patches == drop.num_patches + keep.model.num_prefix_tokens
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(keep(pixels)[:, keep.model.num_prefix_tokens :], drop(pixels))


def test_frozen_encoder_stays_in_eval_and_builds_no_graph(backbones):
    encoder = load_vision_encoder(str(backbones["vit"]))
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    out = encoder(torch.randn(1, 3, 64, 64, requires_grad=True))
    assert not out.requires_grad


def test_timm_preprocessing_comes_from_the_backbone_config(backbones):
    encoder = load_vision_encoder(str(backbones["vit"]))
    config = json.loads((backbones["vit"] / "config.json").read_text())["pretrained_cfg"]
    pixels = encoder.image_transform()(Image.new("RGB", (100, 80), (255, 0, 0)))
    assert pixels.shape == tuple(config["input_size"])
    expected_red = (1.0 - config["mean"][0]) / config["std"][0]
    assert pixels[0].mean().item() == pytest.approx(expected_red, abs=1e-4)


def test_hf_dual_tower_loads_vision_half_and_drops_cls(tiny_clip):
    encoder = load_vision_encoder(f"hf:{tiny_clip}")
    assert isinstance(encoder, HFVisionEncoder)
    assert encoder.num_patches == 16 and encoder.hidden_size == 32  # 4x4 patches, CLS dropped
    full = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = encoder.image_transform()(Image.new("RGB", (50, 40), (0, 128, 255))).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        hidden = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(encoder(pixels), hidden[:, 1:])
    assert load_vision_encoder(str(tiny_clip)).num_patches == 16  # local folder recognised as transformers


def test_unrecognised_spec_says_what_to_write(tmp_path):
    with pytest.raises(ValueError, match="timm:<model name>' or 'hf:<hub id>"):
        load_vision_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json"):
        load_vision_encoder(str(tmp_path))
