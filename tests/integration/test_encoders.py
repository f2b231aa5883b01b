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


@pytest.fixture(scope="module")
def cnn_folder(tmp_path_factory):
    """A timm CNN folder (tf_efficientnet_lite0, random weights): the shape of the real EfficientNet tower."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("tf_efficientnet_lite0", pretrained=False).eval(), str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("layer, grid, width", [(-1, 7, 320), (-2, 14, 112)])
def test_cnn_feature_layer_counts_feature_stages(cnn_folder, layer, grid, width):
    """On a CNN, model.vision_feature_layer indexes timm's feature stages (EfficientNet: 5 of its 7 block groups);
    the tokens are the stage's map flattened row by row, equal to timm's own features_only output."""
    encoder = load_vision_encoder(str(cnn_folder), feature_layer=layer)
    assert (encoder.num_patches, encoder.hidden_size, encoder.grid_size) == (grid * grid, width, (grid, grid))
    reference = timm.create_model(f"local-dir:{cnn_folder}", pretrained=True, features_only=True,
                                  out_indices=(layer % 5,)).eval()
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixels)[0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(encoder(pixels), expected)


def test_cnn_feature_layer_out_of_range_names_the_stages(cnn_folder):
    with pytest.raises(ValueError, match="outside the 5 feature stages"):
        load_vision_encoder(str(cnn_folder), feature_layer=-6)


def test_feature_cache_fingerprints_a_tower_with_batch_norm(cnn_folder):
    """BatchNorm's 0-dim num_batches_tracked buffer is hashed too (it once made the fingerprint raise)."""
    from vlm.data.feature_cache import encoder_fingerprint

    one, other = load_vision_encoder(str(cnn_folder), -1), load_vision_encoder(str(cnn_folder), -2)
    assert encoder_fingerprint(one) == encoder_fingerprint(load_vision_encoder(str(cnn_folder), -1))
    assert encoder_fingerprint(one) != encoder_fingerprint(other)
