"""Optimizer parameter groups: which parameters train at which learning rate."""

from __future__ import annotations

import torch

from ..config import Config
from ..model import VLM


def build_optimizer(model: VLM, config: Config) -> torch.optim.Optimizer:
    """AdamW with the fusion at `train.fusion_lr` and the LM at `train.lr`; no decay on biases and norms."""
    fusion_lr = config.train.fusion_lr or config.train.lr
    groups = []
    for module, lr in ((model.fusion, fusion_lr), (model.lm, config.train.lr), (model.vision, config.train.lr)):
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": config.train.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"train.stage='{config.train.stage}' leaves nothing to train.")
    return torch.optim.AdamW(groups)
