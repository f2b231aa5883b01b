"""The one place that decides what trains — stage, explicit freeze flags, LoRA — and logs it."""

from __future__ import annotations

import logging

from torch import nn

from ..config import FreezeConfig, LoraConfig, TrainConfig

logger = logging.getLogger(__name__)

COMPONENTS = ("vision", "fusion", "lm")
STAGES = {
    "align": {"vision": False, "fusion": True, "lm": False},
    "finetune": {"vision": False, "fusion": True, "lm": True},
}


def stage_plan(stage: str, freeze: FreezeConfig | None = None) -> dict[str, bool]:
    """Which components train: the stage's plan, with each `train.freeze.<component>` that is set overriding it."""
    freeze = freeze or FreezeConfig()
    if stage == "custom":
        unset = [f"train.freeze.{name}" for name in COMPONENTS if getattr(freeze, name) is None]
        if unset:
            raise ValueError(f"train.stage='custom' needs every freeze flag; set {', '.join(unset)} (true or false).")
        return {name: not getattr(freeze, name) for name in COMPONENTS}
    if stage not in STAGES:
        raise ValueError(f"train.stage='{stage}' is unknown; choose one of {sorted([*STAGES, 'custom'])}.")
    plan = dict(STAGES[stage])
    for name in COMPONENTS:
        if getattr(freeze, name) is not None:
            plan[name] = not getattr(freeze, name)
    return plan


def apply_stage(model: nn.Module, stage: str | TrainConfig, freeze: FreezeConfig | None = None) -> str:
    """Set `requires_grad` per component; return the parameter table it logs.

    `stage` is `train.stage`, or the whole `TrainConfig` (then `train.freeze` and `train.lora` apply
    too). With LoRA the LM's own weights stay frozen and its adapters train (peft wraps `model.lm`).
    """
    lora: LoraConfig | None = None
    if isinstance(stage, TrainConfig):
        stage, freeze, lora = stage.stage, stage.freeze, stage.lora
    plan = stage_plan(stage, freeze)
    if lora is not None and lora.enabled:
        if freeze is not None and freeze.lm:
            raise ValueError("train.lora.enabled trains adapters on the LM, but train.freeze.lm is true; unset one.")
        from .lora import apply_lora

        plan["lm"] = True
        model.vision.set_frozen(not plan["vision"])
        model.fusion.requires_grad_(plan["fusion"])
        apply_lora(model, lora)  # freezes the LM's weights, adds trainable adapters
        model.fusion.requires_grad_(plan["fusion"])
    else:
        model.vision.set_frozen(not plan["vision"])
        model.fusion.requires_grad_(plan["fusion"])
        model.lm.requires_grad_(plan["lm"])
    table = parameter_table(model)
    trains = ", ".join(name + (" (LoRA)" if name == "lm" and lora and lora.enabled else "")
                       for name in COMPONENTS if plan[name]) or "nothing"
    logger.info("Stage '%s': training %s\n%s", stage, trains, table)
    return table


def parameter_table(model: nn.Module) -> str:
    rows = []
    for name in COMPONENTS:
        params = list(getattr(model, name).parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        rows.append((name, trainable, total - trainable, total))
    rows.append(("total", *(sum(r[i] for r in rows) for i in (1, 2, 3))))
    lines = [f"{'component':<10} {'trainable':>14} {'frozen':>14} {'total':>14}"]
    lines += [f"{n:<10} {t:>14,} {f:>14,} {a:>14,}" for n, t, f, a in rows]
    return "\n".join(lines)
