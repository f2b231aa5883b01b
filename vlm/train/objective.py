"""What one micro-batch contributes to a step: a loss *sum*, what it is a sum over, and metric sums.

`train_step` (vlm/train/step.py) backpropagates each micro-batch's sum, all-reduces (count, loss sum, metric
sums) once, and divides by the global count, whatever the objective:
- `SFT`: the next-token loss summed over supervised tokens; the count is tokens.
- `DPO` (`train.objective: dpo`): the DPO / IPO loss summed over preference pairs (vlm/train/dpo.py), plus
  `train.dpo.sft_weight` x each pair's chosen-reply NLL per token (RPO); the count is pairs. The policy scores
  both replies in one forward (rows [chosen..., rejected...], the images encoded once); the reference is
  vlm/train/reference.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from ..config import DpoConfig
from ..data.batch import Batch
from .dpo import METRICS, dpo_losses, metric_sums, sequence_logps
from .reference import Reference
from .sharding.base import Strategy

LOSS_SUM = 1
"""`num_items_in_batch` that makes the model's loss the sum of its token losses (vlm/loss.py)."""


@dataclass
class Contribution:
    """loss: this micro-batch's loss sum (to backpropagate); count: what it sums over (tokens or pairs);
    tokens: its supervised tokens (throughput); metrics [len(objective.metrics)]: float64 sums over `count`."""

    loss: torch.Tensor
    count: int
    tokens: int
    metrics: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


class SFT:
    metrics: tuple[str, ...] = ()

    def __call__(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> Contribution:
        loss = strategy.model(**inputs, num_items_in_batch=LOSS_SUM).loss
        tokens = batch.supervised_tokens()
        return Contribution(loss, tokens, tokens)


class DPO:
    metrics = METRICS

    def __init__(self, options: DpoConfig, reference: Reference) -> None:
        self.options = options
        self.reference = reference

    def __call__(self, strategy: Strategy, batch: Batch, inputs: dict[str, Any]) -> Contribution:
        if not batch.pairs:
            raise ValueError(f"train.objective=dpo needs preference pairs ({{prompt, chosen, rejected}}); sample "
                             f"'{batch.ids[0]}' is not one (docs/preference.md).")
        labels = inputs["labels"]
        logps, tokens = sequence_logps(strategy.model(**inputs, num_items_in_batch=LOSS_SUM).logits, labels)
        ref = self.reference.logps(strategy, batch, inputs).to(logps.device)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        valid = (chosen_tokens > 0).to(logps.dtype)  # an evaluation stand-in scores nothing
        o = self.options
        losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, o.beta, o.loss_type, chosen_tokens,
                            rejected_tokens)
        if o.sft_weight:
            losses = losses - o.sft_weight * chosen / chosen_tokens.clamp(min=1)
        return Contribution((losses * valid).sum(), int(valid.sum()), batch.supervised_tokens(),
                            metric_sums(chosen, rejected, ref_chosen, ref_rejected, o.beta, valid))


Objective = Union[SFT, DPO]
