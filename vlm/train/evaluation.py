"""The eval loss of a training run, on every rank, and the unreadable eval samples it met.

Every rank runs every eval forward: an unreadable sample's place is taken by another with no supervised token
(vlm/data/dataset.py, `unreadable="stand_in"`), since FSDP2 and ZeRO-3 gather weights inside each forward and a
rank that skipped one would leave the others waiting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from ..factory import processor_for
from ..data.batch import Batch
from .distributed import DistEnv, all_reduce_sum, gather_objects
from .objective import SFT, Objective
from .sharding.base import Strategy

logger = logging.getLogger(__name__)


@torch.no_grad()
def eval_loss(strategy: Strategy, batches: Iterable[Batch], env: DistEnv, cached: bool,
              objective: Objective = SFT()) -> tuple[float, dict[str, str]]:
    """Collective: the objective's mean loss over all ranks' batches (per supervised token for SFT, per pair
    for DPO), and this rank's unreadable samples ({id: category})."""
    module = strategy.model
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)
    skipped: dict[str, str] = {}
    vision = strategy.unwrapped().vision
    for batch in batches:
        skipped.update({item["skipped"]: item["category"] for item in batch.skipped})
        inputs = batch.forward_inputs(vision, cached, env.device)
        with strategy.autocast():
            part = objective(strategy, batch, inputs)  # a stand-in has no supervised token: it adds 0 and counts 0
        total += torch.tensor([float(part.loss), part.count], dtype=torch.float64)
    module.train()
    total = all_reduce_sum(total, env)
    return float(total[0] / total[1].clamp(min=1)), skipped


def count_skipped(skipped: dict[str, str], problems: dict[str, int], env: DistEnv, step: int) -> dict[str, int]:
    """Collective: every rank's unreadable eval samples (one the sampler repeated to even out ranks counts
    once) plus `problems` (dropped when the eval set was read), by category; one log line on the main process."""
    merged = {k: v for part in gather_objects(skipped, env) for k, v in part.items()}
    counts = dict(problems)
    for category in merged.values():
        counts[category] = counts.get(category, 0) + 1
    if merged and env.is_main:
        names = ", ".join(sorted(merged)[:10]) + (" ..." if len(merged) > 10 else "")
        logger.warning("Evaluation at step %d skipped %d unreadable eval sample(s) (%s): %s; run `vlm data check` "
                       "on data.eval_files.", step, len(merged), ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())),
                       names)
    return counts


def final_retention(final: Path, max_new_tokens: int) -> dict[str, float]:
    """`train.eval_retention`: the saved `final/` (merged or adapters) against its base LM, text only."""
    from ..eval.retention import base_model, retention  # noqa: PLC0415 - only when asked for
    from ..factory import load  # noqa: PLC0415
    from .lora import load_adapter_folder  # noqa: PLC0415

    if (final / "config.json").is_file():
        model, processor = load(final)
    else:
        model = load_adapter_folder(final)
        processor = processor_for(model)
    result = retention(model, base_model(model), processor, max_new_tokens=max_new_tokens)
    logger.info("Retention: %.1f%% of %d text-only replies identical to the base LM's; loss on them %.3f (base %.3f).",
                100 * result["identical_replies"], result["prompts"], result["loss_on_base_replies"],
                result["base_loss_on_own_replies"])
    return {k: v for k, v in result.items() if k != "examples"}
