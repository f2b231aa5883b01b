"""transformers vision towers (CLIP, SigLIP, DINOv2, ...): `hf:<hub id>` or a local folder."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .base import ImageTransform, VisionEncoder


def _vision_model(source: str, pretrained: bool, trust_remote_code: bool) -> torch.nn.Module:
    """Load only the vision half of dual-tower checkpoints (CLIP / SigLIP), the whole model otherwise."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    vision_config = getattr(config, "vision_config", None) or config
    if not pretrained:
        return AutoModel.from_config(vision_config, trust_remote_code=trust_remote_code)
    if vision_config is config:
        return AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)
    model_class = AutoModel._model_mapping[type(vision_config)]
    return model_class.from_pretrained(source, config=vision_config)


def hf_image_transform(processor: Any) -> ImageTransform:
    """PIL image -> [3, H, W] through a transformers image processor."""
    return lambda image: processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class HFVisionEncoder(VisionEncoder):
    library = "transformers"

    def __init__(
        self,
        source: str,
        feature_layer: int = -2,
        drop_prefix_tokens: bool = True,
        pretrained: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(source, feature_layer, drop_prefix_tokens)
        self.model = _vision_model(source, pretrained, trust_remote_code)
        self.image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        config = self.model.config
        image_size = getattr(config, "image_size", 224)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self._measure(size)
        patch = getattr(config, "patch_size", None)
        if patch is not None and drop_prefix_tokens:
            grid_tokens = (size[0] // patch) * (size[1] // patch)
            self.num_prefix_tokens = max(self.num_patches - grid_tokens, 0)  # CLS / register tokens lead the sequence
            self.num_patches -= self.num_prefix_tokens
        self.set_frozen(True)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, self.num_prefix_tokens :]

    def image_transform(self) -> ImageTransform:
        return hf_image_transform(self.image_processor)

    def preprocessing_config(self) -> dict:
        return self.image_processor.to_dict()

    def image_processor_config(self) -> dict:
        """transformers' own preprocessor_config.json: AutoImageProcessor reads the folder."""
        return json.loads(self.image_processor.to_json_string())

    def save_backbone_config(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
