"""Flamingo-style gated cross-attention for any HF decoder (`model.fusion: cross_attention`).

Images occupy no text positions: each `<image>` stays one marker token. Before every n-th
decoder layer a gated block lets each text token attend to the visual tokens of the most recent
image at or before it in its sample:

    x = x + tanh(a_attn) * CrossAttn(Norm(x), visual)
    x = x + tanh(a_ffn)  * FFN(Norm(x))

with both gates 0 at init, so the VLM starts as exactly the base LM. The blocks are the fusion's
parameters, created with it (sized from the LM's shape); `attach` wraps the LM's chosen layers once
in `PreLayerWrapper`, which runs the per-call `VisualState` handed down through the LM's forward
keywords (or, in `generate`, a scoped context variable). Nothing visual is stored on a module
between calls. Options: `model.cross_attention` (`CrossAttentionOptions`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, FusionOptions
from ..image_positions import ImagePositions
from ..tiling import group_views
from .base import Fusion, LMShape, VisionShape, register_fusion
from .decoder_layers import STATE_KWARG, active_state, past_length_of_call, wrap_layers
from .perceiver import PerceiverResampler


class GatedCrossAttentionBlock(nn.Module):
    """One tanh-gated cross-attention + FFN block; `dim` is the LM width."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.GELU(), nn.Linear(ffn_dim, dim, bias=False))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def key_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual [batch, keys, dim] -> K, V [batch, heads, keys, head_dim]."""
        b, n, _ = visual.shape
        visual = visual.to(self.k_proj.weight.dtype)
        k = self.k_proj(visual).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(visual).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
        has_image: torch.Tensor,
    ) -> torch.Tensor:
        """x [batch, q, dim]; k, v [batch, heads, keys, head_dim]; key_mask [batch, q, keys] (True: may
        attend; None: all keys); has_image [batch, q, 1] (False: the row gets no visual contribution)
        -> [batch, q, dim]."""
        b, q, _ = x.shape
        h = x.to(self.q_proj.weight.dtype)
        query = self.q_proj(self.attn_norm(h)).view(b, q, self.heads, self.head_dim).transpose(1, 2)
        mask = None if key_mask is None else key_mask.unsqueeze(1)
        attn = F.scaled_dot_product_attention(query, k, v, attn_mask=mask)
        attn = self.o_proj(attn.transpose(1, 2).reshape(b, q, -1))
        h = h + torch.tanh(self.attn_gate) * torch.where(has_image, attn, 0.0)
        ffn = self.ffn(self.ffn_norm(h))
        h = h + torch.tanh(self.ffn_gate) * torch.where(has_image, ffn, 0.0)
        return h.to(x.dtype)


class VisualState:
    """One call's visual context: per-sample visual tokens (or their per-block K/V) and, per text
    position, which of its sample's images it sees. Called by the layer wrappers; lives for one
    forward / generate call only.

    visual [batch, max_images * tokens, dim]; token_slot [batch, prompt_len] (-1: no image yet);
    last_slot [batch] (the slot seen by positions past the prompt, i.e. generated tokens);
    key_valid [batch, max_images * tokens] (False: padding past a tiled image's own views; None: all real).
    """

    def __init__(
        self, blocks: nn.ModuleDict, visual: torch.Tensor, tokens_per_image: int, token_slot: torch.Tensor,
        last_slot: torch.Tensor, precompute: bool, key_valid: torch.Tensor | None = None,
    ) -> None:
        self.blocks = blocks
        self.visual = visual
        self.token_slot, self.last_slot = token_slot, last_slot
        self.key_slot = torch.arange(visual.shape[1], device=visual.device) // tokens_per_image
        b, _, dim = visual.shape
        rows = torch.arange(b, device=visual.device)
        # Generated tokens all see their sample's last image: its tokens alone, no mask needed.
        self.last_visual = visual.view(b, -1, tokens_per_image, dim)[rows, last_slot.clamp(min=0)]
        self.key_valid = key_valid
        self.last_valid = None if key_valid is None else key_valid.view(b, -1, tokens_per_image)[rows, last_slot.clamp(min=0)]
        self.kv = self.last_kv = None
        self.past_length: int | None = None  # set per LM forward (see decoder_layers.PreLayerState)
        if precompute:
            self.kv = {int(i): block.key_values(visual) for i, block in blocks.items()}
            self.last_kv = {int(i): block.key_values(self.last_visual) for i, block in blocks.items()}

    def __call__(self, layer_index: int, hidden_states: torch.Tensor, past_length: int) -> torch.Tensor:
        block = self.blocks[str(layer_index)]
        token_slot, last_slot = self.token_slot, self.last_slot
        prompt_len, q = token_slot.shape[1], hidden_states.shape[1]
        if past_length >= prompt_len:  # decode steps with the KV cache
            k, v = self.last_kv[layer_index] if self.last_kv is not None else block.key_values(self.last_visual)
            slot = last_slot.unsqueeze(1).expand(-1, q)
            key_mask = None if self.last_valid is None else self.last_valid.unsqueeze(1).expand(-1, q, -1)
        else:
            k, v = self.kv[layer_index] if self.kv is not None else block.key_values(self.visual)
            pos = torch.arange(past_length, past_length + q, device=hidden_states.device)
            slot = torch.where(
                pos < prompt_len, token_slot[:, pos.clamp(max=prompt_len - 1)], last_slot.unsqueeze(1)
            )  # [batch, q]
            key_mask = self.key_slot.view(1, 1, -1) == slot.clamp(min=0).unsqueeze(-1)
            if self.key_valid is not None:
                key_mask = key_mask & self.key_valid.unsqueeze(1)
        if hidden_states.shape[0] != slot.shape[0]:  # beams / num_return_sequences expand the batch
            r = hidden_states.shape[0] // slot.shape[0]
            slot, k, v = slot.repeat_interleave(r, 0), k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
            key_mask = None if key_mask is None else key_mask.repeat_interleave(r, 0)
        return block(hidden_states, k, v, key_mask, (slot >= 0).unsqueeze(-1))


@dataclass
class CrossAttentionOptions(FusionOptions):
    """`model.cross_attention`: where the gated blocks go and what they read."""

    every_n_layers: int = 4
    """A gated cross-attention block before every n-th LM layer (1: every layer)."""
    heads: Optional[int] = None
    """Attention heads of each block; null: the LM's."""
    resampler_depth: int = 0
    """Perceiver-resampler layers before the blocks; 0: none, the blocks read the patch tokens (projected)."""
    resampler_latents: int = 64
    """With `resampler_depth` >= 1: visual tokens per image (learned latents)."""
    gate_lr_scale: float = 1.0
    """The tanh gates' learning rate as a multiple of `train.fusion_lr`. Both gates start at 0, so a block's
    output and its gate each wait on the other to grow; a larger step opens the gates sooner."""

    legacy_keys = {
        "cross_attn_every_n_layers": "every_n_layers", "cross_attn_heads": "heads",
        "resampler_depth": "resampler_depth", "resampler_latents": "resampler_latents",
    }

    def __post_init__(self) -> None:
        if self.every_n_layers < 1:
            raise ConfigError(f"model.cross_attention.every_n_layers must be >= 1, got {self.every_n_layers}.")
        if self.heads is not None and self.heads < 1:
            raise ConfigError(f"model.cross_attention.heads must be >= 1 or null, got {self.heads}.")
        if self.gate_lr_scale <= 0:
            raise ConfigError(f"model.cross_attention.gate_lr_scale must be > 0, got {self.gate_lr_scale}.")
        if self.resampler_depth < 0 or self.resampler_latents < 1:
            raise ConfigError(
                "model.cross_attention.resampler_depth must be >= 0 and model.cross_attention.resampler_latents "
                f">= 1, got {self.resampler_depth} and {self.resampler_latents}."
            )


@register_fusion("cross_attention", CrossAttentionOptions)
class CrossAttentionFusion(Fusion):
    """Gated cross-attention blocks before every `model.cross_attention.every_n_layers`-th LM layer."""

    def __init__(self, options: CrossAttentionOptions, vision: VisionShape, lm: LMShape) -> None:
        super().__init__(options, vision, lm)
        chosen = [i for i in range(lm.num_layers) if (i + 1) % options.every_n_layers == 0]
        if not chosen:
            raise ConfigError(
                f"model.cross_attention.every_n_layers={options.every_n_layers} selects none of the LM's "
                f"{lm.num_layers} layers; use a value <= {lm.num_layers}."
            )
        self.resampler = (
            PerceiverResampler(self.vision_dim, options.resampler_depth, options.resampler_latents)
            if options.resampler_depth > 0 else None
        )
        self.gate_lr_scale = options.gate_lr_scale
        self.visual_norm = nn.LayerNorm(self.vision_dim)
        self.visual_proj = nn.Linear(self.vision_dim, self.lm_dim)
        heads = options.heads or lm.num_heads
        head_dim = lm.head_dim if not options.heads else self.lm_dim // heads
        self.blocks = nn.ModuleDict({
            str(i): GatedCrossAttentionBlock(self.lm_dim, heads, head_dim, lm.intermediate_size, lm.norm_eps)
            for i in chosen
        })
        # The `<image>` marker's own embedding, trained with the fusion while the LM's vocabulary stays
        # frozen; `attach` copies the LM's row into it, so the model still starts as the base LM.
        self.image_embedding = nn.Parameter(torch.zeros(self.lm_dim))
        self.num_visual_tokens = (
            options.resampler_latents if self.resampler is not None else vision.grid[0] * vision.grid[1]
        )

    @property
    def tokens_per_image(self) -> int:
        return 0

    def lr_scales(self) -> dict[str, float]:
        return {f"blocks.{i}.{gate}": self.gate_lr_scale for i in self.blocks for gate in ("attn_gate", "ffn_gate")}

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """features [num_images, num_patches, vision_dim] -> visual tokens [num_images, num_visual_tokens,
        lm_dim] that the cross-attention reads (they fill no text positions)."""
        if self.resampler is not None:
            features = self.resampler(features)
        return self.visual_proj(self.visual_norm(features))

    def attach(self, lm: nn.Module, image_token_id: int) -> None:
        """Copy the marker's LM embedding into `image_embedding` and wrap the chosen layers; idempotent."""
        with torch.no_grad():
            self.image_embedding.copy_(lm.get_input_embeddings().weight[image_token_id])
        wrap_layers(lm, [int(i) for i in self.blocks])

    def forward_methods(self) -> list[tuple[nn.Module, str]]:
        """Besides the contract's methods, each block's `key_values` (run outside the block's forward)."""
        return [*super().forward_methods(), *((block, "key_values") for block in self.blocks.values())]

    def visual_state(
        self, image_features: torch.Tensor | None, images: ImagePositions | None, precompute: bool = False,
    ) -> VisualState | None:
        """image_features [num_views, patches, vision_dim] (samples in order); images: where each image's marker
        sits and which image each position sees (vlm/image_positions.py: in a packed row, never an earlier
        sample's). None when the batch has no images. With tiling (images.views [num_images] views per image) a
        text position reads all of its image's views' tokens (thumbnail and tiles)."""
        if image_features is None or image_features.shape[0] == 0:
            return None
        if images is None:
            raise ValueError("The cross_attention fusion needs the batch's image positions (where each marker sits).")
        if images.placeholder:
            return self._placeholder_state(image_features, images.markers)
        images.check(image_features.shape[0] if images.views is None else images.views.shape[0])
        counts = images.per_row()
        visual = self.embed_images(image_features)  # [num_views, tokens, dim]
        image_keys = None
        if images.views is not None:  # [num_images, max_views * tokens, dim] and which of those keys are real
            visual, image_keys = group_views(visual, images.views)
        n, tokens, dim = visual.shape
        max_images = max(int(counts.max()), 1)
        slots = torch.arange(max_images, device=visual.device)
        index = (counts.cumsum(0) - counts).unsqueeze(1) + slots  # [batch, max_images] into the image list
        valid = (slots < counts.unsqueeze(1)).view(-1, max_images, 1, 1)
        per_sample = torch.where(valid, visual[index.clamp(max=n - 1)], 0.0)  # [batch, max_images, tokens, dim]
        key_valid = None if image_keys is None else torch.where(
            valid.view(-1, max_images, 1), image_keys[index.clamp(max=n - 1)], True
        ).reshape(-1, max_images * tokens)
        return VisualState(
            self.blocks, per_sample.reshape(-1, max_images * tokens, dim), tokens, images.slot_in_row(), counts - 1,
            precompute, key_valid,
        )

    def _placeholder_state(self, image_features: torch.Tensor, image_mask: torch.Tensor) -> VisualState:
        """A text-only training batch's placeholder image: every block runs (so all ranks join the same
        collectives and every parameter gets a gradient) but no text position sees it (slot -1)."""
        batch = image_mask.shape[0]
        visual = self.embed_images(image_features)  # [1, tokens, dim]
        tokens = visual.shape[1]
        no_slot = torch.full_like(image_mask, -1, dtype=torch.long)
        return VisualState(
            self.blocks, visual.expand(batch, -1, -1).contiguous(), tokens, no_slot, no_slot[:, 0], precompute=False
        )

    def _with_marker_embedding(self, embeds: torch.Tensor, images: ImagePositions | None) -> torch.Tensor:
        """embeds [batch, seq, dim] with the marker positions (images.markers [batch, seq]) set to the trained row."""
        if images is None:
            return embeds
        return torch.where(images.markers.unsqueeze(-1), self.image_embedding.to(embeds.dtype), embeds)

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, **kwargs: Any,
    ) -> Any:
        """As the base, with the visual state passed down to the wrapped layers as a forward keyword."""
        inputs_embeds = self._with_marker_embedding(inputs_embeds, images)
        state = self.visual_state(image_features, images)
        if state is not None:
            state.past_length = past_length_of_call({**kwargs, "inputs_embeds": inputs_embeds,
                                                     "attention_mask": attention_mask})
            kwargs[STATE_KWARG] = state
        return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, images: ImagePositions | None = None, cache_visual_kv: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """As the base; each block's visual K/V is computed once per prompt (`cache_visual_kv`) and
        reused at every decode step. Generated tokens see the last image of their sample's prompt."""
        inputs_embeds = self._with_marker_embedding(inputs_embeds, images)
        state = self.visual_state(image_features, images, precompute=cache_visual_kv)
        with active_state(state):
            return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def gate_values(fusion: CrossAttentionFusion) -> dict[str, float]:
    """tanh of every gate, for logging how far training has opened them."""
    return {
        f"{i}.{name}": math.tanh(float(getattr(block, name)))
        for i, block in fusion.blocks.items() for name in ("attn_gate", "ffn_gate")
    }
