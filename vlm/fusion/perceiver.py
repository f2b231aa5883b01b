"""Perceiver resampler (Flamingo): a fixed number of learned latents read an image's patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResamplerLayer(nn.Module):
    """Latents attend to [patches; latents], then a GELU FFN; both residual."""

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.media_norm = nn.LayerNorm(dim)
        self.latent_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim, bias=False), nn.GELU(),
            nn.Linear(ffn_mult * dim, dim, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [n, patches, dim], latents [n, num_latents, dim] -> latents [n, num_latents, dim]."""
        n, m, d = latents.shape
        h = self.heads
        lat = self.latent_norm(latents)
        context = torch.cat([self.media_norm(media), lat], dim=1)
        q = self.q_proj(lat).view(n, m, h, d // h).transpose(1, 2)
        k, v = self.kv_proj(context).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, m, d)
        latents = latents + self.o_proj(attn)
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """[n, patches, dim] -> [n, num_latents, dim], whatever the number of patches."""

    def __init__(self, dim: int, depth: int, num_latents: int, heads: int | None = None) -> None:
        super().__init__()
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"The resampler width {dim} is not divisible by {heads} heads.")
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim ** -0.5)
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(media.dtype).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)
