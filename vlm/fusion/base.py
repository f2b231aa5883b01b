"""The fusion contract: the only questions the model, collator and trainer ask of a strategy.

What a strategy does to the LM:

1. `tokens_per_image`: how many text positions one image occupies (0 for strategies that
   reach the LM another way, such as cross-attention or late fusion: each `<image>` stays one marker).
2. `encode` / `embed_images`: what the strategy reads from an image (by default the vision
   tower's features; early fusion reads raw pixel patches instead) and what fills those positions.
3. `attach` / `lm_forward` / `lm_generate`: what else changes in the LM's forward (blocks
   inserted before layers, logits combined). The default is an unchanged LM call.

How it is built: `build_fusion(config, VisionShape, LMShape)` calls the strategy's constructor with
its own options (`model.<strategy>`, a `FusionOptions` dataclass registered with it) and the shapes of
both backbones. Every parameter is created there; `attach` only wraps LM layers and copies LM
weights into existing parameters (so a fusion that starts as the identity still does).

What it tells the trainer about itself (defaults fit a fusion whose parameters all run inside its
own submodules' `forward`):

- `shard_units()`: submodules to wrap as FSDP units, innermost first (the fusion itself is the last);
- `forward_methods()`: (module, method) pairs other than `forward` that touch parameters, which
  FSDP2 must register so it gathers the parameters for them;
- `external_parameters()`: parameters used directly rather than through a submodule's forward,
  which ZeRO-3 must fetch whenever the VLM runs;
- `lr_scales()`: learning-rate multipliers for some of its parameters, by name (e.g. cross-attention's gates);
- `checkpointable_modules()`: submodules whose activations gradient checkpointing may recompute;
- `export_layers(fmt)`: the layers a foreign format needs (e.g. llava-hf's two projector linears),
  or a one-line reason why this fusion cannot be written in it.

Adding a strategy is one file that subclasses `Fusion`, defines its options, and registers both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import FusionOptions, ModelConfig, register_fusion_options
from ..encoders import VisionEncoder
from ..image_positions import ImagePositions

_REGISTRY: dict[str, type["Fusion"]] = {}

CONTRACT_METHODS = ("encode", "embed_images", "lm_forward", "lm_generate")
"""Fusion entry points the model calls besides `forward` (all of them may touch parameters)."""


@dataclass(frozen=True)
class VisionShape:
    """What a fusion may know of the vision tower: feature width, patch grid, input size (H, W)."""

    hidden_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]

    @classmethod
    def of(cls, vision: VisionEncoder) -> "VisionShape":
        return cls(vision.hidden_size, vision.grid_size, vision.image_size)


@dataclass(frozen=True)
class LMShape:
    """What a fusion may know of the LM, read from its (text) config; unset sizes get the usual defaults."""

    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    head_dim: Optional[int] = None
    intermediate_size: Optional[int] = None
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden_size // self.num_heads)
        object.__setattr__(self, "intermediate_size", self.intermediate_size or 4 * self.hidden_size)

    @classmethod
    def of(cls, lm_config: Any) -> "LMShape":
        """From a transformers config (multimodal wrappers: their text config)."""
        text = lm_config.get_text_config()
        eps = getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_epsilon", None) or 1e-5
        return cls(
            text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size,
            getattr(text, "head_dim", None), getattr(text, "intermediate_size", None), eps,
        )


@dataclass
class FusionOutput(CausalLMOutputWithPast):
    """What `lm_forward` returns when it changes the LM's output: logits [batch, seq, vocab] (or
    [num_kept, vocab] under `logits_to_keep`) and, optionally, `aux_logits` of the same shape: more
    predictions of the same next tokens that the loss also trains (late fusion: the LM's own).
    The model computes the loss from both (vlm/loss.py); a fusion never does."""

    aux_logits: torch.Tensor | None = None


class Fusion(nn.Module, ABC):
    """Base class; `vision` / `lm` describe the backbones, `options` is the strategy's config section."""

    fusion_name: str = ""
    """The name it is registered under (`model.fusion`)."""
    reads_encoder_features: bool = True
    """False for strategies whose `encode` never runs the vision tower (so a feature cache is meaningless)."""

    def __init__(self, options: Optional[FusionOptions], vision: VisionShape, lm: LMShape) -> None:
        super().__init__()
        self.vision_dim = vision.hidden_size
        self.grid = vision.grid
        self.lm_dim = lm.hidden_size

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

    def attach(self, lm: nn.Module, image_token_id: int) -> None:
        """Wrap LM layers / copy LM weights into this fusion's parameters; called once by the VLM at
        construction, before any saved weights are loaded. Creates no parameters. Default: nothing."""

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, **kwargs: Any,
    ) -> Any:
        """Run the LM on embeddings whose image positions are already filled; return its output (or a
        `FusionOutput`) with `logits`, never a loss (the model computes it, vlm/loss.py).

        images: for strategies that occupy no positions (tokens_per_image == 0), where each image's
        marker sits and which image each position sees, as the collator laid them out, with tiling's
        views per image (vlm/image_positions.py); None when the batch has no image or the strategy fills
        positions (its views' tokens already sit in the image's positions).
        kwargs go to the LM, `logits_to_keep` ([batch, seq] bool) included: logits only at those positions.

        `images.placeholder` flags the image the trainer adds to a text-only batch: run every trainable
        parameter as usual but contribute exactly zero, so that in distributed training every rank runs the
        same modules (matching collectives, no unused parameters).
        """
        return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, **kwargs: Any,
    ) -> torch.Tensor:
        """Generate new tokens [batch, new_tokens] from a left-padded prompt (arguments as `lm_forward`)."""
        return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def shard_units(self) -> list[nn.Module]:
        """FSDP units, innermost first, ending with the fusion itself (which holds the rest): by default
        each block of the fusion's own block lists (its ModuleList / ModuleDict children)."""
        containers = [c for c in self.children() if isinstance(c, (nn.ModuleList, nn.ModuleDict))]
        return [*(block for c in containers for block in c.children()), self]

    def forward_methods(self) -> list[tuple[nn.Module, str]]:
        """Methods besides `forward` that touch parameters, for FSDP2's `register_fsdp_forward_method`."""
        return [(self, name) for name in CONTRACT_METHODS]

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used directly (not through a submodule's forward): the fusion's own, by default."""
        return list(self.parameters(recurse=False))

    def lr_scales(self) -> dict[str, float]:
        """Multipliers of `train.fusion_lr` for some parameters, keyed by their names inside the fusion (the
        names sharding keeps); every other parameter trains at `train.fusion_lr` itself."""
        return {}

    def checkpointable_modules(self) -> list[nn.Module]:
        """What `train.gradient_checkpointing_components: [fusion]` recomputes: the repeated blocks (children
        of any ModuleList / ModuleDict inside), or for a fusion without any its parameterised top-level modules."""
        blocks = [
            child for container in self.modules() if isinstance(container, (nn.ModuleList, nn.ModuleDict))
            for child in container.children()
        ]
        return blocks or [child for child in self.children() if any(True for _ in child.parameters())]

    def export_layers(self, fmt: str) -> dict[str, nn.Module] | str:
        """The layers format `fmt` (e.g. `llava-hf`) needs, by its names; or a one-line reason why this
        fusion has no such form."""
        return f"model.fusion={self.fusion_name} has no {fmt} form"


def register_fusion(
    name: str, options: Optional[type[FusionOptions]] = None
) -> Callable[[type[Fusion]], type[Fusion]]:
    """Register a strategy as `model.fusion: <name>`, with its options read from `model.<name>`."""

    def decorator(cls: type[Fusion]) -> type[Fusion]:
        _REGISTRY[name] = cls
        cls.fusion_name = name
        register_fusion_options(name, options)
        return cls

    return decorator


def build_fusion(config: ModelConfig, vision: VisionShape, lm: LMShape) -> Fusion:
    """The strategy `model.fusion` names (validated by the config), built with its options section."""
    return _REGISTRY[config.fusion](config.fusion_options(), vision, lm)
