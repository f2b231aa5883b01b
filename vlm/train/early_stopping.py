"""Early stopping on the eval loss, as transformers' `EarlyStoppingCallback` does it.

An evaluation improves when its loss is lower than the best so far by more than
`train.early_stopping_min_delta`; the run stops once `train.early_stopping_patience` consecutive
evaluations have not. Everything is derived from `TrainState.eval_history`, so a resumed run
continues counting where it left off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..config import Config, ConfigError

__all__ = ["EvalProgress", "check_early_stopping", "eval_progress"]


@dataclass(frozen=True)
class EvalProgress:
    """The lowest eval loss so far and its step (None before any finite one), and `waited`: evaluations
    since the last one that improved by more than `min_delta`."""

    best_step: Optional[int]
    best_loss: Optional[float]
    waited: int


def eval_progress(history: list[dict[str, Any]], min_delta: float) -> EvalProgress:
    """Walk `history` ([{step, loss}], oldest first). As in transformers, each loss is compared with the
    lowest one before it, and any lower loss becomes the best (a NaN / inf loss never improves)."""
    best_step, best_loss, waited = None, math.inf, 0
    for entry in history:
        loss = float(entry["loss"])
        waited = 0 if loss < best_loss - min_delta else waited + 1
        if loss < best_loss:
            best_step, best_loss = int(entry["step"]), loss
    return EvalProgress(best_step, best_loss if best_step is not None else None, waited)


def check_early_stopping(config: Config) -> None:
    """Before step 1: early stopping needs an eval set (train.eval_every is checked when the config loads)."""
    if config.train.early_stopping_patience and not config.data.eval_files:
        raise ConfigError(f"train.early_stopping_patience={config.train.early_stopping_patience} needs an eval "
                          "set; set data.eval_files (or train.early_stopping_patience=0).")
