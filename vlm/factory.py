"""One place that builds a model and its processor together, every setting fixed at construction.

The model takes tensors and the processor makes them (as transformers' Llava and LlavaProcessor);
the loop, `predict`, the CLI and `Pipeline` get both from here, so neither is ever patched after
construction. Data tools need only the processor: `build_processor` reads no LM weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_directory
from .config import DataConfig, ModelConfig
from .encoders import load_vision_encoder
from .folder import read_saved_config, saved_tiling
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


def processor_for(model: VLM, data: DataConfig | None = None, max_tiles: int = 0) -> VLMProcessor:
    """The processor that feeds `model`: its tokenizer, its tower's image transform, its fusion's image size;
    `max_tiles`: `data.tiling.max_tiles` (0: no tiling)."""
    return VLMProcessor(
        model.tokenizer, model.vision.image_transform(), model.config.image_token, model.fusion.tokens_per_image,
        **processor_settings(data), max_tiles=max_tiles, tile_size=model.vision.image_size,
        image_processor_config=model.vision.image_processor_config(),
    )


def build(config: ModelConfig, data: DataConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """Model (pretrained backbones, or a saved VLM under `model.init_from`) and its processor; `data.tiling`
    decides the tiling when `data` is given, else a saved VLM's own."""
    model = VLM.from_config(config)
    source = config.init_from or config.pretrained
    max_tiles = data.tiling.max_tiles if data is not None else _saved_max_tiles(source) if source else 0
    return model, processor_for(model, data, max_tiles)


def load(directory: str | Path, data: DataConfig | None = None) -> tuple[VLM, VLMProcessor]:
    """A saved VLM folder's model and processor, tiling as the folder says."""
    return (model := VLM.from_pretrained(directory)), processor_for(model, data, _saved_max_tiles(directory))


def _saved_max_tiles(directory: str | Path) -> int:
    meta, _ = read_saved_config(Path(directory))
    return int(saved_tiling(Path(directory), meta).get("max_tiles", 0))


def save(model: VLM, processor: VLMProcessor, directory: str | Path) -> Path:
    """One folder that loads offline (`load`): the model's files and the processor's, written to a temporary
    folder and renamed in."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(directory)


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
        max_tiles=max_tiles or 0, tile_size=vision.image_size, image_processor_config=vision.image_processor_config(),
    )
