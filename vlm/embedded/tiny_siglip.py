"""A tiny transformers SigLIP vision tower, briefly pre-trained like the tiny timm ViT.

It stands in for `hf:google/siglip-...` so that the transformers-tower path (`hf:` / local
transformers folders, the llava-hf export) is exercised offline, with features that carry the
synthetic scenes' attributes rather than random noise. Saved as `SiglipVisionModel` +
`SiglipImageProcessor`, i.e. exactly what `AutoModel` / `AutoImageProcessor` load.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
from transformers.image_utils import PILImageResampling

from .pretrain import (
    HEADS, IMAGE_SIZE, PATCH_SIZE, fit_on_scenes, heldout_accuracy, pixel_normalizer, pretraining_summary, scene_pool,
    vit_heldout_pool,
)

SIGLIP_CONFIG = dict(
    image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
    num_attention_heads=4,
)


class _SiglipPretrainer(torch.nn.Module):
    """Scene heads on SigLIP's attention-pooled output, plus the per-patch probe on the penultimate
    layer (the features the VLM reads), as in the timm ViT's pre-training."""

    def __init__(self, tower: SiglipVisionModel) -> None:
        super().__init__()
        self.tower = tower
        dim, n_classes = tower.config.hidden_size, sum(len(v) for v in HEADS.values())
        self.head = torch.nn.Linear(dim, n_classes)
        self.probe = torch.nn.Sequential(
            torch.nn.LayerNorm(dim), torch.nn.Linear(dim, n_classes + tower.config.patch_size**2)
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [batch, 3, H, W] -> head logits [batch, classes], patch outputs [batch, patches, classes + p*p]."""
        out = self.tower(pixel_values=pixels, output_hidden_states=True)
        return self.head(out.pooler_output), self.probe(out.hidden_states[-2])


def pretrain_siglip(
    out_dir: str | Path, steps: int, seed: int = 0, batch_size: int = 32, lr: float = 2e-3
) -> dict:
    """Pre-train a tiny SigLIP vision tower on synthetic scenes; save model + image processor to `out_dir`."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = SiglipVisionConfig(**SIGLIP_CONFIG)
    tower = SiglipVisionModel(config)
    grid = IMAGE_SIZE // config.patch_size
    with torch.no_grad():  # 2-D sin-cos start, as for the timm ViT: position is learnt in few steps
        embeddings = getattr(tower, "vision_model", tower).embeddings  # transformers 4 nests a vision_model
        embeddings.position_embedding.weight.copy_(
            build_sincos2d_pos_embed([grid, grid], config.hidden_size)
        )
    model = _SiglipPretrainer(tower)
    train_x, train_y, train_mask = scene_pool(min(max(steps, 1) * batch_size, 2048), random.Random(f"siglip:{seed}"))
    test_x, test_y, test_mask = vit_heldout_pool(seed, n=256)
    mean, std, prep = pixel_normalizer(train_x)

    losses = fit_on_scenes(model, prep, train_x, train_y, train_mask, steps, lr, batch_size, seed)

    accuracy = heldout_accuracy(model, prep, test_x, test_y, test_mask)
    tower.save_pretrained(out_dir, safe_serialization=True)
    SiglipImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=PILImageResampling.BICUBIC,
        do_rescale=True, do_normalize=True, image_mean=mean, image_std=std,
    ).save_pretrained(out_dir)
    return pretraining_summary(steps, losses, accuracy, mean, std)
