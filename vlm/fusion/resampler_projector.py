"""Intermediate fusion through a Perceiver resampler (`model.fusion: resampler`).

Like `projector`, the image's tokens are scattered into `<image>` slots of the text; unlike it,
a fixed number of learned latents (`model.resampler_latents`) read any number of patches first,
so an image costs the same number of LM positions whatever the tower's grid (as in Flamingo's
resampler or BLIP-2's Q-Former, here without the text conditioning).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .base import Fusion, register_fusion
from .resampler import PerceiverResampler

DEFAULT_DEPTH = 2
"""Resampler layers when `model.resampler_depth` is 0 (its default, which means "none" for cross_attention)."""


@register_fusion("resampler")
class ResamplerFusion(Fusion):
    """Perceiver resampler -> LayerNorm -> linear to the LM width; `resampler_latents` tokens per image."""

    def __init__(self, vision_dim: int, grid: tuple[int, int], lm_dim: int, config: ModelConfig) -> None:
        super().__init__(vision_dim, grid, lm_dim, config)
        if config.resampler_depth < 0 or config.resampler_latents < 1:
            raise ValueError("model.resampler_depth must be >= 0 and model.resampler_latents >= 1.")
        self.num_latents = config.resampler_latents
        self.resampler = PerceiverResampler(vision_dim, config.resampler_depth or DEFAULT_DEPTH, self.num_latents)
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, lm_dim)

    @property
    def tokens_per_image(self) -> int:
        return self.num_latents

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, patches, vision_dim] -> [n, resampler_latents, lm_dim]."""
        return self.proj(self.norm(self.resampler(features)))
