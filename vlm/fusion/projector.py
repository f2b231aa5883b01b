"""LLaVA-style intermediate fusion: each image's patch features are projected into LM token slots."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .base import Fusion, register_fusion

PROJECTORS = ("linear", "mlp2x_gelu", "pixel_shuffle")


def pixel_shuffle(features: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Fold each factor x factor block of neighbouring patches into one token (fewer, wider tokens).

    [n, rows*cols, d] -> [n, (rows/factor)*(cols/factor), d*factor*factor]
    """
    n, _, d = features.shape
    rows, cols = grid
    x = features.reshape(n, rows // factor, factor, cols // factor, factor, d)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (rows // factor) * (cols // factor), factor * factor * d)


@register_fusion("projector")
class ProjectorFusion(Fusion):
    """`model.projector`: `linear`, `mlp2x_gelu` (LLaVA-1.5) or `pixel_shuffle` (+ linear, as in Idefics3)."""

    def __init__(self, vision_dim: int, grid: tuple[int, int], lm_dim: int, config: ModelConfig) -> None:
        super().__init__(vision_dim, grid, lm_dim, config)
        self.kind = config.projector
        self.factor = config.pixel_shuffle_factor if self.kind == "pixel_shuffle" else 1
        if self.kind not in PROJECTORS:
            raise ValueError(f"model.projector='{self.kind}' is unknown; choose one of {list(PROJECTORS)}.")
        if grid[0] % self.factor or grid[1] % self.factor:
            raise ValueError(
                f"model.pixel_shuffle_factor={self.factor} does not divide the {grid[0]}x{grid[1]} patch grid."
            )
        in_dim = vision_dim * self.factor * self.factor
        if self.kind == "mlp2x_gelu":
            self.proj = nn.Sequential(nn.Linear(in_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        else:
            self.proj = nn.Linear(in_dim, lm_dim)

    @property
    def tokens_per_image(self) -> int:
        return (self.grid[0] // self.factor) * (self.grid[1] // self.factor)

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            features = pixel_shuffle(features, self.grid, self.factor)
        return self.proj(features)
