"""The one causal-LM loss: shift by one, ignore unsupervised positions, divide by a global token count.

Every label tensor in the project marks unsupervised positions with `IGNORE_INDEX`; the model calls
`causal_lm_loss` and nothing else computes a token loss. Positions whose logits the loss never reads
(prompts, image slots, padding: most of a sequence) need no output head at all: `logits_positions`
says which ones do, and the LM runs its head only there (transformers' `logits_to_keep`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of a position that is not learned (prompt, image slot, padding); PyTorch's default ignore index."""


def logits_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels [batch, seq] -> [batch, seq] bool: True at position t when token t + 1 is supervised,
    i.e. where the loss reads a logit. The last position never is."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def count_supervised(labels: torch.Tensor) -> int:
    """Tokens the loss reads in labels [batch, seq] (the first position is never a target)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy, computed in float32.

    logits: [batch, seq, vocab], or [num_kept, vocab] computed only at `kept` ([batch, seq] bool, from
    `logits_positions`); labels [batch, seq]. num_items_in_batch: the supervised tokens of the whole
    global batch (all micro-batches, all ranks), so the sum over it gives every token the same weight
    whatever the accumulation and world size; without it, the mean over this batch's tokens.
    """
    if kept is not None:
        source, target = logits, labels[:, 1:][kept[:, :-1]]
    else:
        source, target = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    target = target.to(source.device)
    if num_items_in_batch is None:
        return F.cross_entropy(source.float(), target, ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(source.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
