"""Stages, freeze overrides, per-component learning rates, and the two-stage recipes."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm.config import Config, FreezeConfig, TrainConfig, load_config
from vlm.model import VLM
from vlm.train.freezing import apply_stage, stage_plan
from vlm.train.optim import build_optimizer

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def test_freeze_flags_override_the_stage_and_custom_needs_all():
    assert stage_plan("align") == {"vision": False, "fusion": True, "lm": False}
    assert stage_plan("align", FreezeConfig(lm=False)) == {"vision": False, "fusion": True, "lm": True}
    assert stage_plan("finetune", FreezeConfig(vision=False, fusion=True)) == {"vision": True, "fusion": False, "lm": True}
    with pytest.raises(ValueError, match="train.freeze.vision, train.freeze.lm"):
        stage_plan("custom", FreezeConfig(fusion=False))
    assert stage_plan("custom", FreezeConfig(vision=True, fusion=False, lm=True)) == {
        "vision": False, "fusion": True, "lm": False}


def test_apply_stage_and_per_component_learning_rates(tiny_vlm):
    train = TrainConfig(stage="custom", freeze=FreezeConfig(vision=False, fusion=False, lm=True),
                        lr=1e-4, fusion_lr=3e-3, vision_lr=2e-5, lm_lr=7e-4)
    apply_stage(tiny_vlm, train)
    assert all(p.requires_grad for p in tiny_vlm.vision.parameters())
    assert not any(p.requires_grad for p in tiny_vlm.lm.parameters())
    optimizer = build_optimizer(tiny_vlm, Config(train=train))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert {lr_of[id(p)] for p in tiny_vlm.fusion.parameters()} == {3e-3}
    assert {lr_of[id(p)] for p in tiny_vlm.vision.parameters()} == {2e-5}
    assert not any(id(p) in lr_of for p in tiny_vlm.lm.parameters())


def test_recipes_load_and_stage2_starts_from_stage1(backbones, synthetic, tmp_path, monkeypatch):
    from vlm.train import train

    stage1 = load_config(RECIPES / "stage1_align.yaml")
    stage2 = load_config(RECIPES / "stage2_finetune.yaml")
    assert stage1.train.stage == "align" and stage2.train.stage == "finetune"
    assert stage2.model.init_from == f"{stage1.output_dir}/final"  # the chain as written in the files

    monkeypatch.chdir(tmp_path)  # the recipes' relative run folders land here
    overrides = [f"data.train_files=[{synthetic['train']}]", "train.max_steps=2", "train.batch_size=4"]
    stage1 = load_config(RECIPES / "stage1_align.yaml",
                         [f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", *overrides])
    train(stage1)
    stage2 = load_config(RECIPES / "stage2_finetune.yaml", overrides)
    model = VLM.from_config(stage2.model)
    saved = load_file(Path(stage1.output_dir) / "final" / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    torch.manual_seed(0)
    fresh = VLM.from_config(stage1.model).state_dict()
    fusion = [k for k in saved if k.startswith("fusion.")]
    assert any(not torch.equal(fresh[k], saved[k]) for k in fusion)  # stage 1 trained them
