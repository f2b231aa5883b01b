"""The VLM: a vision encoder, a fusion strategy and a causal LM, composed — nothing more.

It takes tensors; turning samples into them is `VLMProcessor`'s job (vlm/processor.py), and
`vlm.factory` builds the two together. Its loss is `vlm.loss.causal_lm_loss`, nowhere else.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_directory
from .config import ModelConfig, config_to_dict
from .constants import WEIGHTS_NAME
from .encoders import VisionEncoder, load_saved_encoder, load_vision_encoder
from .folder import load_saved_tokenizer, read_saved_config
from .fusion import Fusion, LMShape, VisionShape, build_fusion
from .image_positions import ImagePositions
from .lm import fit_lm_to_tokenizer, load_language_model, prepare_tokenizer
from .loss import causal_lm_loss, logits_positions
from .packed_attention import PackingAttention, lm_attention_inputs
from .tiling import check_image_positions, views_per_image


class VLMFolderConfig(PretrainedConfig):
    """Registers `model_type: vlm` so transformers' Auto classes read our config.json without complaint."""

    model_type = "vlm"


AutoConfig.register("vlm", VLMFolderConfig, exist_ok=True)


class VLM(nn.Module):
    """`vision` (frozen tower) -> `fusion` -> `lm`. Every strategy-specific decision is the fusion's."""

    def __init__(
        self, config: ModelConfig, vision: VisionEncoder, fusion: Fusion, lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.fusion = fusion
        self.lm = lm
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        fusion.attach(lm, self.image_token_id)
        # The LM can compute logits at chosen positions only (transformers' `logits_to_keep`).
        self._logits_at_labels = "logits_to_keep" in inspect.signature(lm.forward).parameters

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VLM":
        """Build from pretrained backbones, or from a saved VLM when `model.init_from` (alias `pretrained`) is set."""
        if config.init_from or config.pretrained:
            return cls.from_pretrained(config.init_from or config.pretrained)
        if not config.vision or not config.lm:
            raise ValueError("Set model.vision and model.lm (or model.pretrained to continue from a saved VLM).")
        vision = load_vision_encoder(
            config.vision, config.vision_feature_layer, config.vision_drop_prefix_tokens, config.trust_remote_code
        )
        lm, tokenizer = load_language_model(config.lm, config.trust_remote_code)
        fit_lm_to_tokenizer(lm, tokenizer, prepare_tokenizer(tokenizer, config.image_token))
        fusion = build_fusion(config, VisionShape.of(vision), LMShape.of(lm.config))
        return cls(config, vision, fusion, lm, tokenizer)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, 3, H, W] -> what the fusion reads, by default the tower's features
        [num_images, num_patches, vision_dim]; the fusion decides (`Fusion.encode`)."""
        return self.fusion.encode(self.vision, pixel_values)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None, sample_ids: list[str] | None = None, placeholder: bool = False,
        repeats: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings [batch, seq, lm_dim] with image positions filled by the fusion, in one scatter.

        image_features [num_images, patches, vision_dim], when given (feature cache), stand in
        for running the tower on pixel_values. With tiling (vlm/tiling.py), pixel_values holds every
        image's views [total_views, 3, H, W] and image_grids [num_images, 2] their grids; the views'
        tokens fill the image's positions in order. sample_ids (the batch's `ids`) name a mismatch.
        placeholder: the one image is a text-only training batch's stand-in (vlm/image_positions.py).
        repeats: the image list is the given images this many times over (see `forward`).
        """
        embeds = self.lm.get_input_embeddings()(input_ids)
        if image_features is not None:
            if not self.fusion.reads_encoder_features:
                raise ValueError(
                    f"model.fusion='{self.config.fusion}' reads raw pixels, not the vision tower's features, so "
                    "cached features (data.cache_features) cannot stand in for it; set data.cache_features=false."
                )
            features = image_features.to(embeds.device)
        elif pixel_values is None or pixel_values.shape[0] == 0:
            return embeds, None
        else:
            features = self.encode_images(pixel_values)
        if repeats > 1:  # [views, ...] -> [repeats * views, ...]: encoded once, read by `repeats` rows each
            features = features.repeat(repeats, *[1] * (features.dim() - 1))
        if image_grids is not None:
            check_image_positions(image_mask if image_mask is not None else input_ids == self.image_token_id,
                                  image_grids, self.fusion.tokens_per_image, sample_ids)
        if self.fusion.tokens_per_image:
            image_embeds = self.fusion.embed_images(features).to(embeds.dtype)
            mask = image_mask if image_mask is not None else input_ids == self.image_token_id
            if placeholder:
                # The fusion runs, so every rank joins the same collectives, and contributes exactly nothing.
                return embeds + image_embeds.sum() * 0, features
            slots = int(mask.sum())
            if slots != image_embeds.shape[0] * image_embeds.shape[1]:
                raise ValueError(
                    f"The batch has {slots} image-token positions but {image_embeds.shape[0]} image(s) "
                    f"x {image_embeds.shape[1]} tokens; the text and the images do not match."
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))
        return embeds, features

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, image_features: torch.Tensor | None = None, full_logits: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None, image_grids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, packing_attention: PackingAttention = "auto",
        image_seen: torch.Tensor | None = None, image_placeholder: bool = False, image_repeats: int = 1,
        **kwargs: Any,
    ) -> Any:
        """input_ids / attention_mask / labels [batch, seq]; pixel_values [num_images, 3, H, W] (with tiling:
        every image's views, and image_grids [num_images, 2], see `embed`).

        With labels, the LM's output head runs only where the loss reads it (positions followed by a
        supervised token; prompts and image slots are most of a sequence): `logits` is then
        [num_supervised, vocab] and the loss is the same. `full_logits=True` keeps [batch, seq, vocab].
        num_items_in_batch: the global batch's supervised tokens (see `vlm.loss.causal_lm_loss`).
        position_ids [batch, seq]: a packed batch (vlm/data/packing.py), positions restarting at each
        sample; attention then keeps samples apart (`packing_attention`, see `vlm.packed_attention.lm_attention_inputs`).
        image_seen [batch, seq]: the collator's image of each position (vlm/image_positions.py; needed for
        packed rows); image_placeholder: the one image is a text-only batch's stand-in.
        image_repeats: the batch's image list is the images given, this many times over (preference pairs:
        the rejected rows read the chosen rows' images again), so the tower and `Fusion.encode` run once.
        """
        image_mask = input_ids == self.image_token_id
        if image_repeats > 1 and image_grids is not None:
            image_grids = image_grids.repeat(image_repeats, 1)
        embeds, features = self.embed(input_ids, pixel_values, image_features, image_mask, image_grids,
                                      placeholder=image_placeholder, repeats=image_repeats)
        images = self._positions(features, image_mask, image_seen, position_ids is not None, image_grids,
                                 image_placeholder)
        if position_ids is not None:
            packed = lm_attention_inputs(self.lm.config, position_ids, embeds.dtype, packing_attention)
            attention_mask = packed.pop("attention_mask")
            kwargs.update(packed)
        kept = None
        if labels is not None and not full_logits and self._logits_at_labels and "logits_to_keep" not in kwargs:
            kept = kwargs["logits_to_keep"] = logits_positions(labels)
        out = self.fusion.lm_forward(
            self.lm, inputs_embeds=embeds, attention_mask=attention_mask, image_features=features, images=images,
            **kwargs,
        )
        if labels is not None:
            loss = causal_lm_loss(out.logits, labels, num_items_in_batch, kept)
            aux_logits = getattr(out, "aux_logits", None)  # more predictions of the same tokens (FusionOutput)
            if aux_logits is not None:
                loss = loss + causal_lm_loss(aux_logits, labels, num_items_in_batch, kept)
            out.loss = loss
        return out

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None, image_grids: torch.Tensor | None = None,
        image_seen: torch.Tensor | None = None, sample_ids: list[str] | None = None, **generation_kwargs: Any,
    ) -> torch.Tensor:
        """Tensors in, token ids out, like a transformers model: the new tokens [batch, new] after a left-padded
        prompt (input_ids / attention_mask [batch, seq]; images as in `forward`; sample_ids name a sample in a
        mismatch error). Greedy unless `generation_kwargs` say otherwise: every strategy decodes through
        transformers' `generate`, so sampling, beams, streamers and stopping criteria all apply. The text is
        the processor's to decode (`VLMProcessor.decode`); `Batch.generation_inputs()` gives these keywords."""
        device = self.lm.device
        input_ids = input_ids.to(device)
        image_mask = input_ids == self.image_token_id
        embeds, features = self.embed(
            input_ids, None if pixel_values is None else pixel_values.to(device),
            None if image_features is None else image_features.to(device), image_mask, image_grids, sample_ids,
        )
        images = self._positions(features, image_mask, image_seen, False, image_grids)
        generation_kwargs.setdefault("do_sample", False)
        return self.fusion.lm_generate(
            self.lm, inputs_embeds=embeds, attention_mask=attention_mask.to(device), image_features=features,
            images=images, **generation_kwargs,
        )

    def _positions(
        self, features: torch.Tensor | None, image_mask: torch.Tensor, image_seen: torch.Tensor | None,
        packed: bool, image_grids: torch.Tensor | None, placeholder: bool = False,
    ) -> ImagePositions | None:
        """Where each image sits, for strategies that occupy no positions (the others' image tokens say it);
        None when the batch has no image."""
        if features is None or self.fusion.tokens_per_image:
            return None
        views = None if image_grids is None else views_per_image(image_grids).to(image_mask.device)
        return ImagePositions.of_batch(image_mask, image_seen, packed, views, placeholder)

    def save_pretrained(self, directory: str | Path) -> None:
        """The model's files: config.json, the weights, the generation config and the backbones' configs. The
        processor writes the rest (tokenizer, preprocessing, tiling); `vlm.factory.save` writes both into one
        folder that loads offline. Written to a temporary folder, then renamed in."""
        if hasattr(self.lm, "peft_config"):
            raise ValueError("The LM carries LoRA adapters; save with vlm.train.lora.save_final (merges or keeps them).")
        with atomic_directory(directory) as tmp:
            self.vision.save_backbone_config(tmp / "vision")
            self.lm.config.save_pretrained(tmp / "lm")
            self.lm.generation_config.save_pretrained(tmp)
            meta = {
                "architectures": ["VLM"],
                "model_type": "vlm",
                "vision_library": self.vision.library,
                "tokens_per_image": self.fusion.tokens_per_image,
                "image_token_id": self.image_token_id,
                "model": config_to_dict(self.config),
            }
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            save_model(self, str(tmp / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VLM":
        """The model of a saved folder (its processor: `VLMProcessor.from_pretrained`, or `vlm.factory.load`)."""
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"'{directory}' is not a saved VLM folder (no {WEIGHTS_NAME}).")
        meta, config = read_saved_config(directory)
        vision = load_saved_encoder(
            directory / "vision", meta["vision_library"], config.vision_feature_layer,
            config.vision_drop_prefix_tokens, config.trust_remote_code,
        )
        tokenizer = load_saved_tokenizer(directory, config)
        lm_config = AutoConfig.from_pretrained(directory / "lm", trust_remote_code=config.trust_remote_code)
        lm = AutoModelForCausalLM.from_config(lm_config, trust_remote_code=config.trust_remote_code)
        lm.generation_config = lm.generation_config.from_pretrained(directory)
        fusion = build_fusion(config, VisionShape.of(vision), LMShape.of(lm_config))
        model = cls(config, vision, fusion, lm, tokenizer)
        load_model(model, str(directory / WEIGHTS_NAME))
        return model
