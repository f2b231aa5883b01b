"""Export to transformers' own `LlavaForConditionalGeneration`, loadable with no code from this repo.

Possible when the VLM is LLaVA-shaped: a transformers vision tower (CLIP / SigLIP), the
`mlp2x_gelu` projector, and a decoder LM that Llava can host (Llama, Mistral, Qwen2, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from ..atomic import atomic_directory
from ..model import VLM
from ..processor import VLMProcessor

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """The model cannot be expressed in the requested format; the message says why."""


def export_llava_hf(model: VLM, processor: VLMProcessor, out: str | Path) -> Path:
    """Write a `LlavaForConditionalGeneration` folder plus its `LlavaProcessor` to `out` (atomically)."""
    vision, fusion, lm = model.vision, model.fusion, model.lm
    if processor.max_tiles > 1:
        raise ExportError(
            f"This model was trained with data.tiling.max_tiles={processor.max_tiles}; Llava reads one untiled view and "
            "LlavaNext lays tiles out differently (docs/tiling.md#export), so neither computes what it computes."
        )
    if vision.library != "transformers":
        raise ExportError(
            f"llava-hf export needs a transformers vision tower (model.vision=hf:...), not {vision.library}:{vision.source}."
        )
    projector = fusion.export_layers("llava-hf")
    if isinstance(projector, str):
        raise ExportError(
            f"llava-hf export needs model.fusion=projector with model.projector.type=mlp2x_gelu; {projector}."
        )
    num_prefix = vision.num_prefix_tokens
    if num_prefix == 1:
        strategy, extra_tokens = "default", 1  # Llava drops exactly one CLS token
    elif num_prefix == 0:
        strategy, extra_tokens = "full", vision.num_patches - _grid_tokens(vision)  # Llava keeps them all
    else:
        raise ExportError(
            f"Llava can drop exactly one prefix token; this tower drops {num_prefix}. "
            "Set model.vision_drop_prefix_tokens to match or use another format."
        )
    config = LlavaConfig(
        vision_config=vision.model.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=fusion.tokens_per_image,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=model.config.vision_feature_layer,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        llava.model.vision_tower.load_state_dict(vision.model.state_dict())
        for name, layer in projector.items():  # linear_1, linear_2
            getattr(llava.model.multi_modal_projector, name).load_state_dict(layer.state_dict())
        llava.model.language_model.load_state_dict(lm.get_decoder().state_dict())
        llava.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    llava.generation_config = lm.generation_config
    llava_processor = LlavaProcessor(
        image_processor=vision.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=vision.model.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=processor.tokenizer.chat_template,
        image_token=model.config.image_token,
        num_additional_image_tokens=extra_tokens,
    )
    _warn_if_template_takes_only_strings(llava_processor, model.config.image_token)
    with atomic_directory(out) as tmp:
        llava.save_pretrained(tmp)
        llava_processor.save_pretrained(tmp)
    return Path(out)


def _warn_if_template_takes_only_strings(processor: LlavaProcessor, image_token: str) -> None:
    """The LM's own chat template is exported as it is; say so when it rejects transformers' message format."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    try:
        ok = image_token in processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template failure means the same thing here
        ok = False
    if not ok:
        logger.warning(
            "The exported chat template (the LM tokenizer's own) does not render list-of-parts content with "
            "%s for image parts; transformers users must pass content as a string containing %s.",
            image_token, image_token,
        )


def _grid_tokens(vision) -> int:
    config = vision.model.config
    return (config.image_size // config.patch_size) ** 2
