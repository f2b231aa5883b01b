"""Flamingo-style gated cross-attention for any HF decoder (`model.fusion: cross_attention`).

Images occupy no text positions: each `<image>` stays one marker token. Before every n-th
decoder layer a gated block lets each text token attend to the visual tokens of the most recent
image at or before it in its sample:

    x = x + tanh(a_attn) * CrossAttn(Norm(x), visual)
    x = x + tanh(a_ffn)  * FFN(Norm(x))

with both gates 0 at init, so the VLM starts as exactly the base LM. The blocks are the fusion's
parameters; the LM's chosen layers are wrapped once (`attach`) by `PreLayerWrapper`, which runs the
per-call `VisualState` handed down through the LM's forward keywords (or, in `generate`, a scoped
context variable). Nothing visual is stored on a module between calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..image_slots import check_markers, image_offsets, is_placeholder, slot_in_sample
from .base import Fusion, register_fusion
from .decoder_layers import STATE_KWARG, active_state, find_decoder_layers, past_length_of_call, wrap_layers
from .resampler import PerceiverResampler


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
    last_slot [batch] (the slot seen by positions past the prompt, i.e. generated tokens).
    """

    def __init__(
        self, blocks: nn.ModuleDict, visual: torch.Tensor, tokens_per_image: int, token_slot: torch.Tensor,
        last_slot: torch.Tensor, precompute: bool,
    ) -> None:
        self.blocks = blocks
        self.visual = visual
        self.token_slot, self.last_slot = token_slot, last_slot
        self.key_slot = torch.arange(visual.shape[1], device=visual.device) // tokens_per_image
        b, _, dim = visual.shape
        rows = torch.arange(b, device=visual.device)
        # Generated tokens all see their sample's last image: its tokens alone, no mask needed.
        self.last_visual = visual.view(b, -1, tokens_per_image, dim)[rows, last_slot.clamp(min=0)]
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
            key_mask = None
        else:
            k, v = self.kv[layer_index] if self.kv is not None else block.key_values(self.visual)
            pos = torch.arange(past_length, past_length + q, device=hidden_states.device)
            slot = torch.where(
                pos < prompt_len, token_slot[:, pos.clamp(max=prompt_len - 1)], last_slot.unsqueeze(1)
            )  # [batch, q]
            key_mask = self.key_slot.view(1, 1, -1) == slot.clamp(min=0).unsqueeze(-1)
        if hidden_states.shape[0] != slot.shape[0]:  # beams / num_return_sequences expand the batch
            r = hidden_states.shape[0] // slot.shape[0]
            slot, k, v = slot.repeat_interleave(r, 0), k.repeat_interleave(r, 0), v.repeat_interleave(r, 0)
            key_mask = None if key_mask is None else key_mask.repeat_interleave(r, 0)
        return block(hidden_states, k, v, key_mask, (slot >= 0).unsqueeze(-1))


@register_fusion("cross_attention")
class CrossAttentionFusion(Fusion):
    """Gated cross-attention blocks before every `model.cross_attn_every_n_layers`-th LM layer."""

    def __init__(self, vision_dim: int, grid: tuple[int, int], lm_dim: int, config: ModelConfig) -> None:
        super().__init__(vision_dim, grid, lm_dim, config)
        if config.resampler_depth < 0 or config.resampler_latents < 1:
            raise ValueError("model.resampler_depth must be >= 0 and model.resampler_latents >= 1.")
        if config.cross_attn_every_n_layers < 1:
            raise ValueError(f"model.cross_attn_every_n_layers must be >= 1, got {config.cross_attn_every_n_layers}.")
        self.every_n = config.cross_attn_every_n_layers
        self.heads = config.cross_attn_heads
        self.resampler = (
            PerceiverResampler(vision_dim, config.resampler_depth, config.resampler_latents)
            if config.resampler_depth > 0 else None
        )
        self.visual_norm = nn.LayerNorm(vision_dim)
        self.visual_proj = nn.Linear(vision_dim, lm_dim)
        self.blocks = nn.ModuleDict()
        # The `<image>` marker's own embedding, trained with the fusion while the LM's vocabulary stays
        # frozen; created in `attach` from the LM's row, so the model still starts as the base LM.
        self.register_parameter("image_embedding", None)
        self.num_visual_tokens = config.resampler_latents if self.resampler is not None else grid[0] * grid[1]

    @property
    def tokens_per_image(self) -> int:
        return 0

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """features [num_images, num_patches, vision_dim] -> visual tokens [num_images, num_visual_tokens,
        lm_dim] that the cross-attention reads (they fill no text positions)."""
        if self.resampler is not None:
            features = self.resampler(features)
        return self.visual_proj(self.visual_norm(features))

    def attach(self, lm: nn.Module, image_token_id: int | None = None) -> None:
        """Create the gated blocks (sized from the LM config) and wrap the chosen layers; idempotent."""
        if image_token_id is not None and self.image_embedding is None:
            row = lm.get_input_embeddings().weight[image_token_id]
            self.image_embedding = nn.Parameter(row.detach().clone().float())
        layers = find_decoder_layers(lm)
        chosen = [i for i in range(len(layers)) if (i + 1) % self.every_n == 0]
        if not chosen:
            raise ValueError(
                f"model.cross_attn_every_n_layers={self.every_n} selects none of the LM's {len(layers)} layers; "
                f"use a value <= {len(layers)}."
            )
        if not len(self.blocks):
            text = lm.config.get_text_config()
            heads = self.heads or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) if not self.heads else None
            head_dim = head_dim or self.lm_dim // heads
            ffn_dim = getattr(text, "intermediate_size", None) or 4 * self.lm_dim
            eps = getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_epsilon", None) or 1e-5
            device = self.visual_proj.weight.device
            self.blocks.update({
                str(i): GatedCrossAttentionBlock(self.lm_dim, heads, head_dim, ffn_dim, eps).to(device)
                for i in chosen
            })
        wrap_layers(lm, chosen)

    def visual_state(
        self, image_features: torch.Tensor | None, image_mask: torch.Tensor | None, precompute: bool = False
    ) -> VisualState | None:
        """image_features [num_images, patches, vision_dim] (samples in order); image_mask [batch, seq]
        True at each image's marker token. None when the batch has no images."""
        if image_features is None or image_features.shape[0] == 0:
            return None
        if image_mask is None:
            raise ValueError("The cross_attention fusion needs `image_mask` (where each image's marker sits).")
        if not len(self.blocks):
            raise RuntimeError("Call `fusion.attach(lm)` once before running the cross_attention fusion.")
        if is_placeholder(int(image_mask.sum()), image_features.shape[0]):
            return self._placeholder_state(image_features, image_mask)
        counts = check_markers(image_mask, image_features.shape[0])  # [batch]
        visual = self.embed_images(image_features)  # [num_images, tokens, dim]
        n, tokens, dim = visual.shape
        max_images = int(counts.max())
        slots = torch.arange(max_images, device=visual.device)
        index = image_offsets(counts).unsqueeze(1) + slots  # [batch, max_images] into the image list
        valid = (slots < counts.unsqueeze(1)).view(-1, max_images, 1, 1)
        per_sample = torch.where(valid, visual[index.clamp(max=n - 1)], 0.0)  # [batch, max_images, tokens, dim]
        token_slot = slot_in_sample(image_mask)
        return VisualState(
            self.blocks, per_sample.reshape(-1, max_images * tokens, dim), tokens, token_slot, counts - 1, precompute
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

    def _with_marker_embedding(self, embeds: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """embeds [batch, seq, dim] with the marker positions (image_mask [batch, seq]) set to the trained row."""
        if image_mask is None or self.image_embedding is None:
            return embeds
        return torch.where(image_mask.unsqueeze(-1), self.image_embedding.to(embeds.dtype), embeds)

    def lm_forward(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None, **kwargs: Any,
    ) -> Any:
        """As the base, with the visual state passed down to the wrapped layers as a forward keyword."""
        inputs_embeds = self._with_marker_embedding(inputs_embeds, image_mask)
        state = self.visual_state(image_features, image_mask)
        if state is not None:
            state.past_length = past_length_of_call({**kwargs, "inputs_embeds": inputs_embeds,
                                                     "attention_mask": attention_mask})
            kwargs[STATE_KWARG] = state
        return lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def lm_generate(
        self, lm: nn.Module, *, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
        image_features: torch.Tensor | None, image_mask: torch.Tensor | None = None,
        cache_visual_kv: bool = True, **kwargs: Any,
    ) -> torch.Tensor:
        """As the base; each block's visual K/V is computed once per prompt (`cache_visual_kv`) and
        reused at every decode step. Generated tokens see the last image of their sample's prompt."""
        inputs_embeds = self._with_marker_embedding(inputs_embeds, image_mask)
        state = self.visual_state(image_features, image_mask, precompute=cache_visual_kv)
        with active_state(state):
            return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)


def gate_values(fusion: CrossAttentionFusion) -> dict[str, float]:
    """tanh of every gate, for logging how far training has opened them."""
    return {
        f"{i}.{name}": math.tanh(float(getattr(block, name)))
        for i, block in fusion.blocks.items() for name in ("attn_gate", "ffn_gate")
    }
