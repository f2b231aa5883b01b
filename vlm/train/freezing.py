"""The one place that decides what trains in each stage, and logs it."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

STAGES = {
    "align": {"vision": False, "fusion": True, "lm": False},
    "finetune": {"vision": False, "fusion": True, "lm": True},
}


def apply_stage(model: nn.Module, stage: str) -> str:
    """Set `requires_grad` per component for `train.stage`; return the parameter table it logs."""
    if stage not in STAGES:
        raise ValueError(f"train.stage='{stage}' is unknown; choose one of {sorted(STAGES)}.")
    plan = STAGES[stage]
    model.vision.set_frozen(not plan["vision"])
    model.fusion.requires_grad_(plan["fusion"])
    model.lm.requires_grad_(plan["lm"])
    table = parameter_table(model)
    logger.info("Stage '%s':\n%s", stage, table)
    return table


def parameter_table(model: nn.Module) -> str:
    rows = []
    for name in ("vision", "fusion", "lm"):
        params = list(getattr(model, name).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append((name, trainable, total - trainable, total))
    rows.append(("total", *(sum(r[i] for r in rows) for i in (1, 2, 3))))
    lines = [f"{'component':<10} {'trainable':>14} {'frozen':>14} {'total':>14}"]
    lines += [f"{n:<10} {t:>14,} {f:>14,} {a:>14,}" for n, t, f, a in rows]
    return "\n".join(lines)
