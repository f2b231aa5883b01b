"""The fusion contract: the only questions the model, collator and trainer ask of a strategy.

1. `tokens_per_image`: how many text positions one image occupies (0 for strategies that
   reach the LM another way, such as cross-attention or late fusion).
2. `encode` / `embed_images`: what the strategy reads from an image (by default the vision
   tower's features; early fusion reads raw pixel patches instead) and what fills those positions.
3. `attach` / `lm_forward` / `lm_generate`: what else changes in the LM's forward (blocks
   inserted, logits combined). The default is an unchanged LM call.

Adding a strategy is one file that subclasses `Fusion` and registers itself by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import ModelConfig
from ..encoders import VisionEncoder

_REGISTRY: dict[str, type["Fusion"]] = {}


@dataclass
class FusionOutput(CausalLMOutputWithPast):
    """What `lm_forward` returns when it changes the LM's output: logits [batch, seq, vocab] (or
    [num_kept, vocab] under `logits_to_keep`) and, optionally, `aux_logits` of the same shape: more
    predictions of the same next tokens that the loss also trains (late fusion: the LM's own).
    The model computes the loss from both (vlm/loss.py); a fusion never does."""

    aux_logits: torch.Tensor | None = None


class Fusion(nn.Module, ABC):
    """Base class; `vision_dim` / `grid` describe the encoder output, `lm_dim` the LM's hidden size."""

    reads_encoder_features: bool = True
    """False for strategies whose `encode` never runs the vision tower (so a feature cache is meaningless)."""

    def __init__(self, vision_dim: int, grid: tuple[int, int], lm_dim: int, config: ModelConfig) -> None:
        super().__init__()
        self.vision_dim = vision_dim
        self.grid = grid
        self.lm_dim = lm_dim

    @property
    @abstractmethod
    def tokens_per_image(self) -> int:
        """Text positions one image occupies in the LM's sequence."""

    def encode(self, vision: VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [num_images, 3, H, W] -> what `embed_images` reads; default: the tower's
        features [num_images, num_patches, vision_dim]."""
        return vision(pixel_values)

    @abstractmethod
    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """features (from `encode`) [num_images, num_patches, dim] -> [num_images, tokens_per_image, lm_dim]."""

    def attach_vision(self, vision: VisionEncoder) -> None:
        """Create what depends on the tower beyond its output shape (e.g. its input size); called once by
        the VLM at construction, before any weights are loaded. Default: nothing."""

    def attach(self, lm: nn.Module, image_token_id: int | None = None) -> None:
        """Install what the strategy needs inside the LM (e.g. wrap decoder layers); called once by the
        VLM at construction, before any weights are loaded. Default: nothing."""

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None, **kwargs: Any,
    ) -> Any:
        """Run the LM on embeddings whose image positions are already filled; return its output (or a
        `FusionOutput`) with `logits`, never a loss (the model computes it, vlm/loss.py).

        image_mask [batch, seq]: True at image-token positions (with tokens_per_image == 0, one marker
        per image), for strategies that need to know where each image sits in the text.
        kwargs go to the LM, `logits_to_keep` ([batch, seq] bool) included: logits only at those positions.

        One image with no marker at all is the placeholder the trainer adds to a text-only batch
        (vlm/image_slots.py): run every trainable parameter as usual but contribute exactly zero, so that
        in distributed training every rank runs the same modules (matching collectives, no unused parameters).
        """
        return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        """Generate new tokens [batch, new_tokens] from a left-padded prompt."""
        return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def register_fusion(name: str) -> Callable[[type[Fusion]], type[Fusion]]:
    def decorator(cls: type[Fusion]) -> type[Fusion]:
        _REGISTRY[name] = cls
        return cls

    return decorator


def build_fusion(config: ModelConfig, vision_dim: int, grid: tuple[int, int], lm_dim: int) -> Fusion:
    if config.fusion not in _REGISTRY:
        raise ValueError(
            f"model.fusion='{config.fusion}' is not a registered strategy; choose one of {sorted(_REGISTRY)}."
        )
    return _REGISTRY[config.fusion](vision_dim, grid, lm_dim, config)
