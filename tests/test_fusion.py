import pytest
import torch

from vlm.config import ModelConfig
from vlm.fusion import build_fusion
from vlm.fusion.projector import pixel_shuffle


@pytest.mark.parametrize(
    "projector, factor, tokens, in_features",
    [("linear", 2, 64, 32), ("mlp2x_gelu", 2, 64, 32), ("pixel_shuffle", 2, 16, 128), ("pixel_shuffle", 4, 4, 512)],
)
def test_projector_shapes(projector, factor, tokens, in_features):
    config = ModelConfig(projector=projector, pixel_shuffle_factor=factor)
    fusion = build_fusion(config, vision_dim=32, grid=(8, 8), lm_dim=48)
    assert fusion.tokens_per_image == tokens
    out = fusion.embed_images(torch.randn(3, 64, 32))
    assert out.shape == (3, tokens, 48)
    first = fusion.proj[0] if isinstance(fusion.proj, torch.nn.Sequential) else fusion.proj
    assert first.in_features == in_features


def test_pixel_shuffle_groups_spatial_neighbours():
    # 4x4 grid, one channel holding each patch's index: token 0 must hold patches 0, 1, 4, 5.
    features = torch.arange(16.0).reshape(1, 16, 1)
    out = pixel_shuffle(features, (4, 4), 2)
    assert out.shape == (1, 4, 4)
    assert out[0, 0].tolist() == [0, 1, 4, 5]
    assert out[0, 3].tolist() == [10, 11, 14, 15]


def test_unknown_fusion_and_projector_are_named():
    with pytest.raises(ValueError, match="model.fusion='nope'.*projector"):
        build_fusion(ModelConfig(fusion="nope"), 8, (2, 2), 8)
    with pytest.raises(ValueError, match="model.projector='mlp3'"):
        build_fusion(ModelConfig(projector="mlp3"), 8, (2, 2), 8)
    with pytest.raises(ValueError, match="does not divide the 6x6"):
        build_fusion(ModelConfig(projector="pixel_shuffle", pixel_shuffle_factor=4), 8, (6, 6), 8)
