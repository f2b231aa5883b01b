"""Vision towers behind one interface; `load_vision_encoder` resolves a spec string to one."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoImageProcessor

from .base import ImageTransform, VisionEncoder
from .hf_encoder import HFVisionEncoder, hf_image_transform
from .timm_encoder import TimmVisionEncoder, is_timm_folder, timm_image_transform

__all__ = ["VisionEncoder", "ImageTransform", "load_vision_encoder", "load_saved_encoder", "saved_image_transform"]


def load_vision_encoder(
    spec: str, feature_layer: int = -2, drop_prefix_tokens: bool = True, trust_remote_code: bool = False
) -> VisionEncoder:
    """`timm:<name>`, `hf:<hub id>`, or a local folder recognised by its config.json."""
    if spec.startswith("timm:"):
        name = spec[len("timm:") :]
        if Path(name).is_dir():
            name = f"local-dir:{name}"
        return TimmVisionEncoder(name, feature_layer, drop_prefix_tokens)
    if spec.startswith("hf:"):
        return HFVisionEncoder(spec[len("hf:") :], feature_layer, drop_prefix_tokens, True, trust_remote_code)
    path = Path(spec)
    if path.is_dir():
        if is_timm_folder(path):
            return TimmVisionEncoder(f"local-dir:{path}", feature_layer, drop_prefix_tokens)
        if (path / "config.json").is_file():
            return HFVisionEncoder(str(path), feature_layer, drop_prefix_tokens, True, trust_remote_code)
        raise ValueError(f"model.vision='{spec}': folder has no config.json, so it is neither timm nor transformers.")
    raise ValueError(
        f"model.vision='{spec}' is not a local folder; use 'timm:<model name>' or 'hf:<hub id>' "
        "(e.g. timm:vit_base_patch16_siglip_224 or hf:google/siglip-base-patch16-224)."
    )


def load_saved_encoder(
    directory: Path, library: str, feature_layer: int, drop_prefix_tokens: bool, trust_remote_code: bool = False
) -> VisionEncoder:
    """Rebuild the tower's architecture from a saved VLM folder; its weights come with the VLM's."""
    if library == "timm":
        return TimmVisionEncoder(f"local-dir:{directory}", feature_layer, drop_prefix_tokens, pretrained=False)
    return HFVisionEncoder(str(directory), feature_layer, drop_prefix_tokens, False, trust_remote_code)


def saved_image_transform(directory: Path, library: str, trust_remote_code: bool = False) -> ImageTransform:
    """The tower's preprocessing from a saved VLM folder, without building the tower (no weights read)."""
    if library == "timm":
        data_config = json.loads((directory / "preprocessor_config.json").read_text())
        data_config.pop("image_processor_type", None)
        return timm_image_transform(data_config)
    processor = AutoImageProcessor.from_pretrained(directory / "vision", trust_remote_code=trust_remote_code)
    return hf_image_transform(processor)
