"""One optimizer step, for every strategy: forward and backward per micro-batch, one all-reduce, update or skip.

Each micro-batch's loss is a *sum* (of its token losses for SFT, of its pairs' losses for DPO:
vlm/train/objective.py), so nothing needs the global count before the backward. After the last backward, one
all-reduce adds up (count, loss sum, stop requests, the objective's metric sums) over the ranks, and the
gradients are scaled by world size / count: DDP, FSDP2 and ZeRO average gradients
over ranks, the world size turns that average back into the sum, and the token count makes it the mean over
the whole global batch. So the update (and the logged loss) equals a single process's on the same global
batch, whatever the world size, padding or accumulation (torchtune's full-finetune recipe does the same).
A non-finite reduced loss skips the update on every rank alike. Every micro-batch has samples to run:
the dataset replaces an unreadable sample by the next one that loads (vlm/data/dataset.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..data.batch import Batch
from .distributed import DistEnv, all_reduce_sum
from .objective import SFT, Objective
from .optim import Updater
from .sharding.base import Strategy
from .state import TrainState

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step did: `bad` (skipped: the loss was not finite on some rank), the sample ids it
    read, this rank's supervised tokens, whether a stop was requested on any rank, and for an applied step
    its loss (mean per supervised token, or per pair for DPO, over all ranks), gradient norm (before clipping)
    and the objective's metrics (means over the same count)."""

    bad: bool
    ids: list[str]
    tokens: int
    stop: bool
    loss: float = float("nan")
    grad_norm: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)


def train_step(strategy: Strategy, updater: Updater, state: TrainState, micro: list[Batch], env: DistEnv,
               cached: bool, stop_requested: bool, objective: Objective = SFT()) -> StepResult:
    """One optimizer step over `micro` (this rank's micro-batches); records the applied step in `state`
    (step, history) and a skipped one through `updater.skip`. `cached`: the batches carry the tower's
    features (data.cache_features) instead of pixels. One collective of ours per step, the same on every
    rank; the strategy's own (DDP's gradient all-reduce, FSDP's gathers, ZeRO's partitions) come on top."""
    vision = strategy.unwrapped().vision
    ids: list[str] = []
    tokens = count = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    metric_sums = torch.zeros(len(objective.metrics), dtype=torch.float64, device=env.device)
    for i, batch in enumerate(micro):
        for item in batch.skipped:
            state.count_skipped(item["category"])
            logger.warning("Skipping sample '%s': %s", item["skipped"], item["detail"])
        ids += batch.ids
        inputs = batch.forward_inputs(vision, cached, env.device)
        with strategy.micro_batch(last=i == len(micro) - 1):
            with strategy.autocast():
                part = objective(strategy, batch, inputs)
            strategy.backward(part.loss)
        loss_sum += part.loss.detach().double()
        metric_sums += part.metrics.to(metric_sums.device)
        tokens += part.tokens
        count += part.count
    local = torch.cat([torch.stack([loss_sum.new_tensor(float(count)), loss_sum,
                                    loss_sum.new_tensor(float(stop_requested))]), metric_sums])
    global_count, global_loss, stops, *metrics = all_reduce_sum(local, env).tolist()
    result = StepResult(bad=not math.isfinite(global_loss), ids=ids, tokens=tokens, stop=stops > 0)
    if result.bad:
        updater.skip(state, ids)
        return result
    global_count = max(global_count, 1.0)
    strategy.scale_gradients(env.world_size / global_count)
    result.grad_norm = updater.apply()
    result.loss = global_loss / global_count
    result.metrics = {name: value / global_count for name, value in zip(objective.metrics, metrics)}
    state.step += 1
    state.history.append({"step": state.step, "loss": result.loss, "lr": updater.lr, "grad_norm": result.grad_norm,
                          **result.metrics})
    return result
