from dataclasses import dataclass

import pytest
import torch

from vlm.config import FusionOptions, ModelConfig
from vlm.fusion import Fusion, LMShape, VisionShape, build_fusion, register_fusion
from vlm.fusion.projector import pixel_shuffle
from vlm.factory import processor_for, save

LM = LMShape(hidden_size=48, num_layers=2, num_heads=4, vocab_size=100)


def vision(grid: int, dim: int = 32) -> VisionShape:
    return VisionShape(dim, (grid, grid), (8 * grid, 8 * grid))


@pytest.mark.parametrize(
    "projector, factor, tokens, in_features",
    [("linear", 2, 64, 32), ("mlp2x_gelu", 2, 64, 32), ("pixel_shuffle", 2, 16, 128), ("pixel_shuffle", 4, 4, 512)],
)
def test_projector_shapes(projector, factor, tokens, in_features):
    config = ModelConfig().with_fusion("projector", type=projector, pixel_shuffle_factor=factor)
    fusion = build_fusion(config, vision(8), LM)
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
        build_fusion(ModelConfig(fusion="nope"), vision(2, 8), LM)
    with pytest.raises(ValueError, match="model.projector.type='mlp3'"):
        build_fusion(ModelConfig().with_fusion("projector", type="mlp3"), vision(2, 8), LM)
    with pytest.raises(ValueError, match="model.projector.pixel_shuffle_factor=4 does not divide the 6x6"):
        build_fusion(ModelConfig().with_fusion("projector", type="pixel_shuffle", pixel_shuffle_factor=4), vision(6, 8), LM)


@dataclass
class MeanTokenOptions(FusionOptions):
    scale: float = 1.0


@pytest.fixture()
def mean_token_fusion():
    """A strategy defined entirely here, the way a new file in vlm/fusion/ would: one image -> one token."""
    from vlm.config import _FUSIONS
    from vlm.fusion.base import _REGISTRY

    @register_fusion("test_mean_token", MeanTokenOptions)
    class MeanTokenFusion(Fusion):
        def __init__(self, options: MeanTokenOptions, vision: VisionShape, lm: LMShape) -> None:
            super().__init__(options, vision, lm)
            self.scale = options.scale
            self.proj = torch.nn.Linear(vision.hidden_size, lm.hidden_size)

        @property
        def tokens_per_image(self) -> int:
            return 1

        def embed_images(self, features: torch.Tensor) -> torch.Tensor:
            return self.scale * self.proj(features.mean(1, keepdim=True))

    yield MeanTokenFusion
    del _REGISTRY["test_mean_token"], _FUSIONS["test_mean_token"]


def test_a_new_strategy_is_one_registration(mean_token_fusion, untrained_model_config, tmp_path):
    """Config section, model, training hooks and saving work for a strategy no other file names."""
    from vlm.config import load_config
    from vlm.model import VLM

    config = load_config(None, ["model.fusion=test_mean_token", "model.test_mean_token.scale=0.5"]).model
    assert config.fusion_options() == MeanTokenOptions(scale=0.5)
    with pytest.raises(ValueError, match=r"Unknown config key 'model\.test_mean_token\.scael'"):
        load_config(None, ["model.test_mean_token.scael=2"])
    torch.manual_seed(0)
    model = VLM.from_config(untrained_model_config.with_fusion("test_mean_token", scale=0.5))
    assert isinstance(model.fusion, mean_token_fusion) and model.fusion.tokens_per_image == 1
    assert model.fusion.shard_units() == [model.fusion] and model.fusion.external_parameters() == []
    assert model.fusion.checkpointable_modules() == [model.fusion.proj]
    assert isinstance(model.fusion.export_layers("llava-hf"), str)
    save(model, processor_for(model), tmp_path / "saved")
    assert VLM.from_pretrained(tmp_path / "saved").config == model.config


def test_cross_attention_describes_its_units_and_extra_methods(untrained_model_config):
    from vlm.model import VLM

    model = VLM.from_config(untrained_model_config.with_fusion("cross_attention", every_n_layers=1))
    blocks = list(model.fusion.blocks.values())
    assert model.fusion.shard_units() == [*blocks, model.fusion]
    assert {(id(m), name) for m, name in model.fusion.forward_methods()} >= {(id(b), "key_values") for b in blocks}
    assert model.fusion.external_parameters() == [model.fusion.image_embedding]
    marker = model.lm.get_input_embeddings().weight[model.image_token_id]
    assert torch.equal(model.fusion.image_embedding, marker)  # copied in by `attach`, so it starts as the LM


def test_late_product_lets_the_question_choose_the_kind_of_answer_and_the_image_the_value():
    """A question-blind vision head ranks 'large' (size) above 'red' (colour); for a colour question the LM
    knows only that a colour comes. The product picks the image's colour; the mixture cannot beat the head's
    favourite without overruling the image, so it answers the LM's guess or the wrong kind."""
    red, blue, large = 1, 2, 3
    lm_logits = torch.full((1, 1, 100), -20.0)
    lm_logits[..., [red, blue]] = 0.0  # a colour, either one
    vision_logp = torch.full((1, 1, 100), -20.0)
    vision_logp[..., large], vision_logp[..., red], vision_logp[..., blue] = -0.1, -3.0, -8.0
    vision_logp = vision_logp.log_softmax(-1)
    has_image = torch.ones(1, 1, dtype=torch.bool)
    hidden = torch.zeros(1, 1, 48)
    for combine, expected in (("product", red), ("mixture", large)):
        fusion = build_fusion(ModelConfig().with_fusion("late", combine=combine), vision(2, 8), LM)
        torch.nn.init.constant_(fusion.gate.bias, 2.0)  # trust the image a lot
        logits = fusion.mix(lm_logits, hidden, vision_logp, has_image)
        assert int(logits.argmax(-1)) == expected, combine
    no_image = torch.zeros(1, 1, dtype=torch.bool)
    assert torch.equal(fusion.mix(lm_logits, hidden, vision_logp, no_image), lm_logits)
    with pytest.raises(ValueError, match="model.late.combine must be 'mixture' or 'product'"):
        ModelConfig().with_fusion("late", combine="sum")
