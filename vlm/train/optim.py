"""Optimizer parameter groups: which parameters train at which learning rate."""

from __future__ import annotations

import torch

from ..config import Config
from ..model import VLM


def build_optimizer(model: VLM, config: Config) -> torch.optim.Optimizer:
    """AdamW with one learning rate per component (`train.fusion_lr` / `lm_lr` / `vision_lr`, each
    defaulting to `train.lr`); no decay on biases and norms. Only parameters that train are included
    (with LoRA, the LM's are its adapters); a parameter shared by two components is counted once."""
    train = config.train
    groups, seen = [], set()
    for module, lr in ((model.fusion, train.fusion_lr), (model.lm, train.lm_lr), (model.vision, train.vision_lr)):
        lr = train.lr if lr is None else lr
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
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
