"""The one interface every vision tower answers: pixels in, patch features out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn

ImageTransform = Callable[[Image.Image], torch.Tensor]


class VisionEncoder(nn.Module, ABC):
    """Wraps a pretrained vision backbone.

    forward: pixel_values [batch, 3, H, W] -> features [batch, num_patches, hidden_size].
    While frozen it stays in eval mode whatever `.train()` says, and runs without autograd,
    so no activations are kept for a tower that is never updated.
    """

    library: str

    def __init__(self, source: str, feature_layer: int, drop_prefix_tokens: bool) -> None:
        super().__init__()
        self.source = source
        self.feature_layer = feature_layer
        self.drop_prefix_tokens = drop_prefix_tokens
        self.frozen = True
        self.hidden_size = 0
        self.num_patches = 0
        self.image_size: tuple[int, int] = (0, 0)
        """(H, W) of the preprocessed pixel_values the tower takes."""
        self.num_prefix_tokens = 0
        """Leading CLS / register tokens of the backbone's output that are dropped (`drop_prefix_tokens`)."""

    def _measure(self, image_size: tuple[int, int]) -> None:
        """Record the output shape by running one blank image (cheaper than model-specific arithmetic).

        In eval mode: libraries return models in training mode, where a BatchNorm tower would fold the blank
        image into its running statistics and change every feature after it."""
        self.eval()
        with torch.no_grad():
            out = self._features(torch.zeros(1, 3, *image_size))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.num_patches, self.hidden_size = int(out.shape[1]), int(out.shape[2])

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        self.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self._features(pixel_values)
        return self._features(pixel_values)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of the output, for fusions that regroup neighbouring patches."""
        side = int(round(self.num_patches**0.5))
        if side * side != self.num_patches:
            raise ValueError(f"{self.source}: {self.num_patches} output tokens do not form a square grid.")
        return side, side

    def shard_units(self) -> list[nn.Module]:
        """FSDP units, innermost first: the backbone's repeated blocks (timm `blocks`, transformers
        `encoder.layers`) if it has them, then the tower itself."""
        for module in self.modules():
            for attr in ("blocks", "layers", "layer"):
                found = getattr(module, attr, None)
                if isinstance(found, nn.ModuleList) and len(found) > 1:
                    return [*found, self]
        return [self]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the backbone's activations in the backward pass (each library's own mechanism)."""
        if hasattr(self.model, "set_grad_checkpointing"):  # timm
            self.model.set_grad_checkpointing(True)
        else:  # transformers
            self.model.activation_checkpointing_enable({"use_reentrant": False})

    @abstractmethod
    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> [batch, num_patches, hidden_size]."""

    @abstractmethod
    def image_transform(self) -> ImageTransform:
        """PIL image -> [3, H, W] tensor, preprocessing as the backbone's own config specifies."""

    @abstractmethod
    def preprocessing_config(self) -> dict:
        """The image preprocessing settings, as a JSON-able dict (part of the feature-cache key)."""

    def image_processor_config(self) -> dict:
        """What a saved folder's preprocessor_config.json holds (the processor writes it): the preprocessing,
        typed so a reader knows whose settings they are."""
        return {"image_processor_type": self.library, **self.preprocessing_config()}

    @abstractmethod
    def save_backbone_config(self, directory: Path) -> None:
        """Write what `load_saved_encoder` needs to rebuild this tower offline (weights saved elsewhere)."""
