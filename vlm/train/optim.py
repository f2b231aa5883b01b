"""The optimizer, its learning-rate schedule, and the decision to apply or skip each step's update.

`build_optimizer` says which parameters train at which learning rate. `Updater` owns what happens at
the end of a step: the update and the schedule's advance, or, when the loss was not finite on some
rank, a skipped step (no update, gradients cleared), and the abort after `train.max_bad_steps` of
those in a row. The strategy builds the optimizer (on its final, possibly sharded parameters) and
keeps it, because DeepSpeed's engine steps it; everything else about it is here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from ..config import Config
from ..model import VLM
from .sharding import Strategy
from .state import TrainState

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """Too many consecutive bad (non-finite) steps; a checkpoint of the last good state was saved."""


def build_optimizer(model: VLM, config: Config) -> torch.optim.Optimizer:
    """AdamW with one learning rate per component (`train.fusion_lr` / `lm_lr` / `vision_lr`, each
    defaulting to `train.lr`, times the fusion's own `lr_scales()` where it names a parameter); no decay on
    biases and norms. Only parameters that train are included
    (with LoRA, the LM's are its adapters); a parameter shared by two components is counted once."""
    train = config.train
    groups, seen = [], set()
    components = ((model.fusion, train.fusion_lr, model.fusion.lr_scales()), (model.lm, train.lm_lr, {}),
                  (model.vision, train.vision_lr, {}))
    for module, lr, scales in components:
        lr = train.lr if lr is None else lr
        by_scale: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                by_scale.setdefault(scales.get(name, 1.0), []).append(p)
        for scale, params in by_scale.items():
            groups += [
                {"params": [p for p in params if p.ndim >= 2], "lr": lr * scale, "weight_decay": train.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "lr": lr * scale, "weight_decay": 0.0},
            ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"train.stage='{config.train.stage}' leaves nothing to train.")
    return torch.optim.AdamW(groups)


class Updater:
    """Apply or skip each step's update; owns the cosine-with-warmup schedule of the strategy's optimizer."""

    def __init__(self, strategy: Strategy, config: Config, save: Callable[[], Path]) -> None:
        self.strategy = strategy
        self.save = save
        self.max_grad_norm = config.train.max_grad_norm
        self.max_bad_steps = config.train.max_bad_steps
        self.scheduler = get_cosine_schedule_with_warmup(
            strategy.optimizer, config.train.warmup_steps, config.train.max_steps
        )
        self.consecutive_bad = 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def apply(self) -> float:
        """Clip, update, advance the schedule; return the gradient norm before clipping."""
        grad_norm = self.strategy.step(self.max_grad_norm)
        self.scheduler.step()
        self.consecutive_bad = 0
        return grad_norm

    def skip(self, state: TrainState, ids: list[str]) -> None:
        """Discard this step's gradients and record it in `state`; after `train.max_bad_steps` in a row,
        `save()` (collective) the last good state and raise `TrainingAborted`."""
        self.strategy.skip_step()
        self.consecutive_bad += 1
        state.bad_steps.append({"after_step": state.step, "samples": ids})
        logger.warning("Non-finite loss after step %d (samples %s): step skipped, no update.", state.step, ids)
        if self.consecutive_bad >= self.max_bad_steps:
            path = self.save()
            raise TrainingAborted(
                f"{self.consecutive_bad} consecutive steps had a NaN/inf loss (last samples: {ids}). "
                f"The last good state is saved in '{path}'. Lower train.lr, check these samples with "
                "`vlm data check`, or raise train.max_bad_steps."
            )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (the optimizer's own state is saved by the strategy, sharded)."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
