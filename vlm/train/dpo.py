"""The DPO / IPO loss on sequence log-probabilities: the math only, equal to TRL's `DPOTrainer` on the same
logits (tests/unit/test_dpo_trl.py). Who computes the log-probabilities (policy, reference) is
vlm/train/objective.py's and vlm/train/reference.py's business.

A pair's sequence log-probability is the sum of its reply tokens' log-probabilities (the supervised tokens:
the prompt, image positions and padding are not scored), as in Rafailov et al. and TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..loss import IGNORE_INDEX, logits_positions

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
"""What a DPO step logs, under TRL's names (each a mean over the step's pairs)."""


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of the supervised tokens' log-probabilities [rows] (float32) and their count [rows].

    logits: [rows, seq, vocab], or [num_kept, vocab] at `logits_positions(labels)` only (what `VLM.forward`
    returns with labels); labels [rows, seq] with IGNORE_INDEX where not scored."""
    kept = logits_positions(labels)
    if logits.dim() == 3:
        logits = logits[kept]
    target = labels[:, 1:][kept[:, :-1]].to(logits.device)
    token_logps = -F.cross_entropy(logits.float(), target, reduction="none")  # log_softmax at the target, fused
    rows = kept.nonzero()[:, 0].to(logits.device)
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1).to(logits.device)
    return logps, tokens


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss_type: str, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair loss [pairs] from the policy's and the reference's sequence log-probabilities [pairs].

    sigmoid (DPO): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).
    ipo: (chosen log-ratio / its tokens - rejected log-ratio / its tokens - 1 / (2 beta))^2: IPO on per-token
    averages, the normalisation TRL uses (the paper's sums make the loss scale with reply length)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"train.dpo.loss_type={loss_type!r}: choose sigmoid or ipo.")


def metric_sums(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                beta: float, valid: torch.Tensor) -> torch.Tensor:
    """[len(METRICS)] sums over the `valid` pairs (the step divides by all ranks' pairs): TRL's rewards are
    beta x the log-ratios, accuracy the share of pairs whose chosen reward is higher."""
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    values = torch.stack([chosen_reward, rejected_reward, (chosen_reward > rejected_reward).float(),
                          chosen_reward - rejected_reward, chosen, rejected])
    return (values.detach().double() * valid).sum(1)
