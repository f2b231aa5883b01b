"""Packed rows (`data.packing`): several samples share one row; nothing may cross between them.

A packed batch carries `position_ids` [rows, seq] that restart at 0 where each sample begins (the
padding at a row's end is one more run of positions), the convention transformers' own packing
support reads. From it follow the LM's attention inputs (`lm_attention_inputs`): a block-diagonal
causal mask built explicitly (eager / SDPA), or no mask at all for flash-attention kernels, which read
sample boundaries from position_ids themselves (variable-length attention, no dense mask). Which image
each position sees is the collator's to say (`image_seen`, vlm/image_positions.py), not read from here.

Unpacked batches pass no position_ids and none of this runs.
"""

from __future__ import annotations

from typing import Literal

import torch

PackingAttention = Literal["auto", "mask", "position_ids"]

_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [rows, seq] -> [rows, seq] bool: True where a sample begins, i.e. wherever the position
    does not follow the previous one (as transformers reads it)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """position_ids [rows, seq] -> [rows, seq]: 0 for the row's first sample, 1 for the next, ..."""
    return sample_starts(position_ids).long().cumsum(1) - 1


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[rows, 1, seq, seq]: position q attends to k <= q of its own sample only. Bool (True: attend) for
    SDPA; with a float `dtype`, additive (0 / the dtype's minimum), as eager attention adds it."""
    seg = segment_ids(position_ids)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg.unsqueeze(2) == seg.unsqueeze(1)) & causal  # [rows, seq, seq]
    allowed = allowed.unsqueeze(1)
    if dtype is None or dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def uses_varlen_attention(lm_config: object) -> bool:
    """True when the LM's attention kernel takes sample boundaries from position_ids (flash-attention)."""
    return getattr(lm_config, "_attn_implementation", None) in _VARLEN_IMPLEMENTATIONS


def lm_attention_inputs(
    lm_config: object, position_ids: torch.Tensor, dtype: torch.dtype, how: PackingAttention = "auto",
) -> dict[str, torch.Tensor | bool | None]:
    """The `attention_mask` / `position_ids` keywords for a packed batch.

    how: `mask` builds the block-diagonal mask (what CPU and tests use); `position_ids` passes no mask,
    so flash-attention runs variable-length attention and SDPA / eager have transformers derive the same
    mask from position_ids; `auto` picks `position_ids` for flash-attention kernels, else `mask`.
    """
    if how == "auto":
        how = "position_ids" if uses_varlen_attention(lm_config) else "mask"
    # No KV cache: transformers reads packing from position_ids only when there is none (and a packed
    # row is a training batch, never decoded).
    if how == "position_ids":
        return {"attention_mask": None, "position_ids": position_ids, "use_cache": False}
    eager = getattr(lm_config, "_attn_implementation", None) == "eager"
    mask = block_causal_mask(position_ids, dtype if eager else None)
    return {"attention_mask": mask, "position_ids": position_ids, "use_cache": False}
