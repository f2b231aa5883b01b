"""Pre-training on synthetic scenes, shared by the tiny vision towers (`tiny_backbones.py`'s timm
ViT and `tiny_siglip.py`'s SigLIP): the scene pools, the scene-attribute heads and their loss, the
training loop and its learning-rate schedule, pixel normalisation and the summary each tower
reports. Both towers import from here; neither imports the other's internals.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, random_scene, render_scene

IMAGE_SIZE = 64
PATCH_SIZE = 8
"""Both towers' patch size: each patch's own object mask (`scene_pool`) is PATCH_SIZE**2 pixels."""
# One classifier over the concatenated label groups; loss and accuracy are per group.
HEADS: dict[str, list[str]] = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "count": [str(c) for c in COUNTS],
    "position": list(POSITIONS),
}
MASK_WEIGHT = 4.0


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first tenth of `steps`, then cosine decay to 0."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def head_mean(xs: list[float], k: int = 5) -> float | None:
    return float(np.mean(xs[:k])) if xs else None


def tail_mean(xs: list[float], k: int = 5) -> float | None:
    return float(np.mean(xs[-k:])) if xs else None


def scene_pool(n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` rendered scenes: uint8 images (n, 3, H, W), scene labels (n, groups; -100 = undefined)
    and per-patch object masks (n, patches, patch_size**2)."""
    patch = PATCH_SIZE
    grid = IMAGE_SIZE // patch
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = torch.empty((n, len(HEADS)), dtype=torch.long)
    for i in range(n):
        scene = random_scene(rng)
        images[i] = np.asarray(render_scene(scene, IMAGE_SIZE, rng))
        values = [scene.colour, scene.shape, scene.size, str(scene.count), scene.position]
        labels[i] = torch.tensor([HEADS[k].index(v) if v is not None else -100 for k, v in zip(HEADS, values)])
    # The background is grey and every palette colour is saturated, so saturation marks objects.
    saturated = (images.max(-1).astype(np.int16) - images.min(-1)) > 60
    masks = saturated.reshape(n, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4)
    masks = masks.reshape(n, grid * grid, patch * patch)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, torch.from_numpy(masks)


def vit_heldout_pool(seed: int, n: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The held-out scenes that the towers report accuracy on (reproducible for checks)."""
    return scene_pool(n, random.Random(f"vit-heldout:{seed}"))


def _multi_head_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[int, int]]]:
    """Sum of per-group cross-entropies, and (correct, total) per group."""
    loss = logits.new_zeros(())
    stats: dict[str, tuple[int, int]] = {}
    start = 0
    for g, (name, classes) in enumerate(HEADS.items()):
        part, target = logits[:, start : start + len(classes)], labels[:, g]
        start += len(classes)
        valid = target != -100
        if valid.any():
            loss = loss + F.cross_entropy(part[valid], target[valid])
        correct = (part.argmax(-1) == target)[valid].sum().item()
        stats[name] = (int(correct), int(valid.sum().item()))
    return loss, stats


def scene_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor):
    """Class-token heads + the same heads on every patch + each patch's own object mask.

    `model(x)` returns (head logits [batch, classes], patch outputs [batch, patches, classes + p*p]).
    """
    logits, dense = model(x)
    loss, stats = _multi_head_loss(logits, y)
    n_classes, n_patches = logits.shape[-1], dense.shape[1]
    per_patch_y = y.repeat_interleave(n_patches, 0)
    dense_loss, dense_stats = _multi_head_loss(dense[..., :n_classes].flatten(0, 1), per_patch_y)
    mask_logits = dense[..., n_classes:]
    mask_loss = F.binary_cross_entropy_with_logits(mask_logits, masks.float())
    dense_stats["pixel_mask"] = (int(((mask_logits > 0) == masks).sum().item()), masks.numel())
    return loss + dense_loss + MASK_WEIGHT * mask_loss, stats, dense_stats


@torch.no_grad()
def heldout_accuracy(
    model: torch.nn.Module, prep: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    masks: torch.Tensor, chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Accuracy per label group of the class-token `head` and the `patch_probe` (+ pixel mask) on scenes."""
    model.eval()
    totals: dict[str, dict[str, list[int]]] = {"head": {}, "patch_probe": {}}
    for i in range(0, len(x), chunk):
        sl = slice(i, i + chunk)
        _, *stats = scene_loss(model, prep(x[sl]), y[sl], masks[sl])
        for kind, st in zip(totals, stats):
            for k, (c, n) in st.items():
                acc = totals[kind].setdefault(k, [0, 0])
                acc[0] += c
                acc[1] += n
    return {kind: {k: round(c / max(n, 1), 4) for k, (c, n) in st.items()} for kind, st in totals.items()}


def pixel_normalizer(
    train_x: torch.Tensor,
) -> tuple[tuple[float, ...], tuple[float, ...], Callable[[torch.Tensor], torch.Tensor]]:
    """Per-channel mean / std of uint8 scenes [n, 3, H, W] (rounded, as saved in the preprocessing
    config) and the function that normalises a uint8 batch with them."""
    pixels = train_x.float().div(255).transpose(0, 1).reshape(3, -1)
    mean = tuple(round(v, 3) for v in pixels.mean(1).tolist())
    std = tuple(round(v, 3) for v in pixels.std(1).tolist())
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean_t) / std_t

    return mean, std, prep


def pretraining_summary(steps: int, losses: list[float], accuracy: dict, mean: tuple, std: tuple) -> dict:
    """What `pretraining.json` records for each tower."""
    return {
        "steps": steps,
        "first_loss": head_mean(losses),
        "final_loss": tail_mean(losses),
        "heldout_accuracy": accuracy,
        "mean": list(mean),
        "std": list(std),
    }


def fit_on_scenes(
    model: torch.nn.Module, prep: Callable[[torch.Tensor], torch.Tensor], train_x: torch.Tensor,
    train_y: torch.Tensor, train_mask: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int,
) -> list[float]:
    """The towers' shared pre-training loop (AdamW, warmup + cosine, clipping) on scene batches; returns losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    losses: list[float] = []
    model.train()
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(len(train_x), (batch_size,), generator=gen)
        loss, _, _ = scene_loss(model, prep(train_x[idx]), train_y[idx], train_mask[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses
