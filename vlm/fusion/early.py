"""Early fusion, Fuyu-style (`model.fusion: early`): raw image patches straight into the token stream.

No vision encoder runs in the forward pass. The pixels are the tower's own preprocessing output
(so `pixel_values` are the same tensors every strategy gets), cut into the tower's patch grid
(patch size = image size / grid, e.g. 64 px on an 8x8 grid -> 8x8-pixel patches), each patch
flattened and linearly embedded to the LM's width, plus a learned position embedding per patch.
The LM learns to see from scratch, so this strategy needs the LM to train (`train.stage: finetune`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..encoders import VisionEncoder
from .base import Fusion, LMShape, VisionShape, register_fusion


def patchify(pixel_values: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """[n, C, H, W] -> [n, (H/ph)*(W/pw), C*ph*pw], patches in row-major order."""
    n, c, h, w = pixel_values.shape
    ph, pw = patch
    x = pixel_values.reshape(n, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // ph) * (w // pw), c * ph * pw)


@register_fusion("early")
class EarlyFusion(Fusion):
    """Linear patch embedding + learned position embedding; the tower is bypassed entirely."""

    reads_encoder_features = False

    def __init__(self, options: None, vision: VisionShape, lm: LMShape) -> None:
        super().__init__(options, vision, lm)
        (height, width), (rows, cols) = vision.image_size, vision.grid
        if height % rows or width % cols:
            raise ConfigError(
                f"model.fusion='early': the tower's {height}x{width} input does not split into its {rows}x{cols} "
                "patch grid; use a tower whose input size is a multiple of its patch size."
            )
        self.patch = (height // rows, width // cols)
        self.position_embedding = nn.Parameter(torch.randn(rows * cols, self.lm_dim) * 0.02)
        self.patch_embed = nn.Linear(3 * self.patch[0] * self.patch[1], self.lm_dim)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def encode(self, vision: VisionEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> flattened patches [n, rows*cols, 3*ph*pw]; the tower is not run."""
        return patchify(pixel_values.to(self.position_embedding.dtype), self.patch)

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """patches [n, rows*cols, 3*ph*pw] -> [n, rows*cols, lm_dim]."""
        return self.patch_embed(features) + self.position_embedding
