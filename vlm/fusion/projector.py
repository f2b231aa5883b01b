"""LLaVA-style intermediate fusion: each image's patch features are projected into LM token slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import ConfigError, FusionOptions
from .base import Fusion, LMShape, VisionShape, register_fusion

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


@dataclass
class ProjectorOptions(FusionOptions):
    """`model.projector`: how each patch feature becomes an LM token."""

    type: Literal["linear", "mlp2x_gelu", "pixel_shuffle"] = "mlp2x_gelu"
    """`linear`, `mlp2x_gelu` (LLaVA-1.5) or `pixel_shuffle` (+ linear, as in Idefics3)."""
    pixel_shuffle_factor: int = 2
    """`type: pixel_shuffle`: fold each factor x factor block of patches into one token."""

    legacy_keys = {"projector": "type", "pixel_shuffle_factor": "pixel_shuffle_factor"}

    def __post_init__(self) -> None:
        if self.pixel_shuffle_factor < 1:
            raise ConfigError(f"model.projector.pixel_shuffle_factor must be >= 1, got {self.pixel_shuffle_factor}.")


@register_fusion("projector", ProjectorOptions)
class ProjectorFusion(Fusion):
    """`model.projector.type`: `linear`, `mlp2x_gelu` or `pixel_shuffle` + linear."""

    def __init__(self, options: ProjectorOptions, vision: VisionShape, lm: LMShape) -> None:
        super().__init__(options, vision, lm)
        self.kind = options.type
        self.factor = options.pixel_shuffle_factor if self.kind == "pixel_shuffle" else 1
        if self.kind not in PROJECTORS:
            raise ConfigError(f"model.projector.type='{self.kind}' is unknown; choose one of {list(PROJECTORS)}.")
        grid = vision.grid
        if grid[0] % self.factor or grid[1] % self.factor:
            raise ConfigError(
                f"model.projector.pixel_shuffle_factor={self.factor} does not divide the {grid[0]}x{grid[1]} "
                "patch grid; choose a divisor, or a model.vision_feature_layer whose grid it divides (on a CNN the "
                "stage before the last has twice the grid: EfficientNet-Lite0's -2 is 14x14 at 224 px)."
            )
        in_dim = self.vision_dim * self.factor * self.factor
        if self.kind == "mlp2x_gelu":
            self.proj = nn.Sequential(nn.Linear(in_dim, self.lm_dim), nn.GELU(), nn.Linear(self.lm_dim, self.lm_dim))
        else:
            self.proj = nn.Linear(in_dim, self.lm_dim)

    @property
    def tokens_per_image(self) -> int:
        return (self.grid[0] // self.factor) * (self.grid[1] // self.factor)

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            features = pixel_shuffle(features, self.grid, self.factor)
        return self.proj(features)

    def export_layers(self, fmt: str) -> dict[str, nn.Module] | str:
        """llava-hf's `multi_modal_projector` is exactly `mlp2x_gelu`: its `linear_1` and `linear_2`."""
        if fmt == "llava-hf" and self.kind == "mlp2x_gelu":
            return {"linear_1": self.proj[0], "linear_2": self.proj[2]}
        return f"model.projector.type={self.kind} has no {fmt} form (llava-hf needs mlp2x_gelu)"
