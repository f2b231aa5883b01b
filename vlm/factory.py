"""One place that builds a model and its processor together, every setting fixed at construction.

The model takes tensors and the processor makes them (as transformers' Llava and LlavaProcessor);
the loop, `predict`, the CLI and `Pipeline` get both from here, so neither is ever patched after
construction. Data tools need only the processor: `build_processor` reads no LM weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import DataConfig, ModelConfig
from .encoders import load_vision_encoder
from .fusion import LMShape, VisionShape, build_fusion
from .lm import load_lm_config, load_lm_tokenizer, prepare_tokenizer
from .model import VLM
from .processor import VLMProcessor


def processor_settings(data: DataConfig | None) -> dict[str, Any]:
    """The processor's data settings from `data` (max_length, truncate_text, max_image_pixels); with no
    data config, the processor's own defaults (no length limit), as for generation."""
    if data is None:
        return {}
    return {"max_length": data.max_length, "truncate_text": data.truncate_text,
            "max_image_pixels": data.max_image_pixels}


def processor_for(model: VLM, data: DataConfig | None = None) -> VLMProcessor:
    """The processor that feeds `model`: its tokenizer, its tower's image transform, its fusion's image size,
    its tiling (`model.max_tiles`)."""
    return VLMProcessor(
        model.tokenizer, model.vision.image_transform(), model.config.image_token, model.fusion.tokens_per_image,
        **processor_settings(data), max_tiles=model.max_tiles, tile_size=model.vision.image_size,
    )


def build(config: ModelConfig, data: DataConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """Model (pretrained backbones, or a saved VLM under `model.init_from`) and its processor; `data.tiling`
    decides the tiling when `data` is given (it is saved with the model), else a saved VLM's own."""
    model = VLM.from_config(config, None if data is None else data.tiling.max_tiles)
    return model, processor_for(model, data)


def load(directory: str | Path, data: DataConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """A saved VLM folder's model and processor, tiling as the folder says."""
    model = VLM.from_pretrained(directory)
    return model, processor_for(model, data)


def build_processor(config: ModelConfig, data: DataConfig | None = None) -> VLMProcessor:
    """The processor `build` would give, without loading the LM's weights (from a saved folder, no weights
    at all): for `vlm data check --config` and other data tools."""
    source = config.init_from or config.pretrained
    max_tiles = None if data is None else data.tiling.max_tiles
    if source:
        return VLMProcessor.from_pretrained(source, **processor_settings(data), max_tiles=max_tiles)
    vision = load_vision_encoder(
        config.vision, config.vision_feature_layer, config.vision_drop_prefix_tokens, config.trust_remote_code
    )
    tokenizer = load_lm_tokenizer(config.lm, config.trust_remote_code)
    prepare_tokenizer(tokenizer, config.image_token)
    lm_config = load_lm_config(config.lm, config.trust_remote_code)
    with torch.device("meta"):  # only its tokens_per_image is read: allocate nothing
        fusion = build_fusion(config, VisionShape.of(vision), LMShape.of(lm_config))
    return VLMProcessor(
        tokenizer, vision.image_transform(), config.image_token, fusion.tokens_per_image, **processor_settings(data),
        max_tiles=max_tiles or 0, tile_size=vision.image_size,
    )
