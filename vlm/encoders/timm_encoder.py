"""timm vision towers: `timm:<model name>`, `timm:hf-hub:<repo>` or a local timm checkpoint folder."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models._hub import save_config_for_hf

from .base import ImageTransform, VisionEncoder

logger = logging.getLogger(__name__)


def timm_image_transform(data_config: dict) -> ImageTransform:
    """PIL image -> [3, H, W] through timm's eval transform for `data_config` (input_size, mean, std, ...)."""
    transform = create_transform(**data_config, is_training=False)
    return lambda image: transform(image.convert("RGB"))


class TimmVisionEncoder(VisionEncoder):
    library = "timm"

    def __init__(
        self, name: str, feature_layer: int = -2, drop_prefix_tokens: bool = True, pretrained: bool = True
    ) -> None:
        super().__init__(name, feature_layer, drop_prefix_tokens)
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        # What `forward_intermediates` indexes: a ViT's blocks, a CNN's feature stages (where the resolution
        # drops: EfficientNet's 5 of its 7 block groups, ResNet's stem + 4 layers, ConvNeXt's 4 stages).
        levels = list(getattr(self.model, "feature_info", None) or [])
        if not levels or not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"timm model '{name}' has no feature_info / forward_intermediates; cannot pick a feature layer."
            )
        depth = len(levels)
        kind = "blocks" if hasattr(self.model, "num_prefix_tokens") else "feature stages"
        if not -depth <= feature_layer < depth:
            raise ValueError(f"model.vision_feature_layer={feature_layer} is outside the {depth} {kind} of '{name}'.")
        self._block_index = feature_layer % depth
        self.feature_level = dict(levels[self._block_index])
        """timm's feature_info entry of the level read (module, num_chs, reduction): what docs and logs name."""
        # Blocks after the chosen one never influence the output: drop them so no step pays for them.
        self.model.prune_intermediate_layers([self._block_index], prune_norm=True, prune_head=True)
        self._nlc = hasattr(self.model, "num_prefix_tokens")
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0)) if drop_prefix_tokens else 0
        self.data_config = resolve_data_config(model=self.model)
        self._measure(tuple(self.data_config["input_size"][1:]))
        self.set_frozen(True)
        logger.info(
            "Vision tower %s: features of %s (%s %d of %d, stride %s): %d tokens of width %d per %dx%d image.",
            name, self.feature_level.get("module", "?"), kind[:-1], self._block_index + 1, depth,
            self.feature_level.get("reduction", "?"), self.num_patches, self.hidden_size, *self.image_size,
        )

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        keep_prefix = self._nlc and not self.drop_prefix_tokens
        # Only token models (ViTs) take return_prefix_tokens; CNNs' forward_intermediates has no such argument.
        tokens = {"return_prefix_tokens": keep_prefix, "output_fmt": "NLC"} if self._nlc else {"output_fmt": "NCHW"}
        out = self.model.forward_intermediates(
            pixel_values, indices=[self._block_index], norm=False, intermediates_only=True, **tokens
        )[0]
        if keep_prefix:
            patches, prefix = out
            return torch.cat([prefix, patches], dim=1)
        if not self._nlc:  # convnets: [B, C, H, W] -> [B, H*W, C]
            out = out.flatten(2).transpose(1, 2)
        return out

    def image_transform(self) -> ImageTransform:
        return timm_image_transform(self.data_config)

    def preprocessing_config(self) -> dict:
        return dict(self.data_config)

    def save_backbone_config(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_config_for_hf(self.model, str(directory / "config.json"))


def is_timm_folder(path: Path) -> bool:
    """timm checkpoint folders carry `architecture` in config.json; transformers ones carry `model_type`."""
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return "architecture" in data and "model_type" not in data
