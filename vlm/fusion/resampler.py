"""Intermediate fusion through a Perceiver resampler (`model.fusion: resampler`).

Like `projector`, the image's tokens are scattered into `<image>` slots of the text; unlike it,
a fixed number of learned latents (`model.resampler.latents`) read any number of patches first,
so an image costs the same number of LM positions whatever the tower's grid (as in Flamingo's
resampler or BLIP-2's Q-Former, here without the text conditioning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, FusionOptions
from .base import Fusion, LMShape, VisionShape, register_fusion
from .perceiver import PerceiverResampler


@dataclass
class ResamplerOptions(FusionOptions):
    """`model.resampler`: the Perceiver resampler's size."""

    depth: int = 2
    """Resampler layers (>= 1)."""
    latents: int = 64
    """Learned latents, i.e. LM positions per image."""

    legacy_keys = {"resampler_depth": "depth", "resampler_latents": "latents"}

    def __post_init__(self) -> None:
        if self.depth < 1 or self.latents < 1:
            raise ConfigError(
                f"model.resampler.depth and model.resampler.latents must be >= 1, got {self.depth} and {self.latents}."
            )

    @classmethod
    def from_legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """Earlier versions shared `resampler_depth` with cross_attention, where 0 meant "none"; here it meant 2."""
        values = super().from_legacy(flat)
        if values.get("depth") == 0:
            values["depth"] = 2
        return values


@register_fusion("resampler", ResamplerOptions)
class ResamplerFusion(Fusion):
    """Perceiver resampler -> LayerNorm -> linear to the LM width; `latents` tokens per image."""

    def __init__(self, options: ResamplerOptions, vision: VisionShape, lm: LMShape) -> None:
        super().__init__(options, vision, lm)
        self.num_latents = options.latents
        self.resampler = PerceiverResampler(self.vision_dim, options.depth, self.num_latents)
        self.norm = nn.LayerNorm(self.vision_dim)
        self.proj = nn.Linear(self.vision_dim, self.lm_dim)

    @property
    def tokens_per_image(self) -> int:
        return self.num_latents

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, patches, vision_dim] -> [n, latents, lm_dim]."""
        return self.proj(self.norm(self.resampler(features)))
