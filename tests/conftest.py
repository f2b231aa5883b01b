"""Shared fixtures: tiny backbones and synthetic data, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))  # shared builders such as tests/hostile.py

SUITES = ("unit", "integration", "distributed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by its folder: `pytest -m unit` runs the fast tests (`make test-fast`)."""
    for item in items:
        suite = next((part for part in Path(str(item.path)).parts if part in SUITES), None)
        if suite is not None:
            item.add_marker(getattr(pytest.mark, suite))


@pytest.fixture(scope="session")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny timm ViT and a tiny Llama LM (briefly pre-trained), saved in their libraries' formats."""
    from vlm.embedded.tiny_backbones import make_tiny_backbones

    return make_tiny_backbones(tmp_path_factory.mktemp("backbones"), vit_steps=30, lm_steps=30, seed=0)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlm.embedded.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data"), n_train=96, n_eval=16, n_test=8, seed=0)


@pytest.fixture(scope="session")
def trained_run(backbones, synthetic, tmp_path_factory) -> Path:
    """A 40-step `vlm train` run (projector, finetune) with periodic eval loss and generation metrics
    (train.eval_generate); its folder holds final/, train_summary.json, TensorBoard logs, captured.log."""
    import contextlib
    import io

    from vlm.cli import main

    out = tmp_path_factory.mktemp("run")
    config = out / "config.yaml"
    config.write_text(
        f"""
model:
  vision: {backbones['vit']}
  lm: {backbones['lm']}
  fusion: projector
  projector:
    type: pixel_shuffle
data:
  train_files: [{synthetic['train']}]
  eval_files: [{synthetic['eval']}]
train:
  stage: finetune
  max_steps: 40
  batch_size: 8
  lr: 1.0e-3
  fusion_lr: 2.0e-3
  warmup_steps: 4
  eval_every: 20
  eval_generate: true
  eval_max_new_tokens: 12
  eval_generate_samples: 15
  report_to: tensorboard
output_dir: {out}
"""
    )
    # Captured like CI / SLURM / nohup output: not a terminal. The log is kept for the test below.
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        assert main(["train", str(config), "train.seed=1"]) == 0
    (out / "captured.log").write_text(log.getvalue())
    return out


@pytest.fixture(scope="session")
def captions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from captions import write_captions_file

    return write_captions_file(tmp_path_factory.mktemp("gen-data"))


@pytest.fixture(scope="session")
def train_captioner(backbones, captions_file, tmp_path_factory) -> Callable[[list[str]], Path]:
    """`train(overrides)` -> a run folder trained 120 steps on the eight caption scenes (tests/captions.py),
    whose final/ answers differ per image; each configuration trains once per session, whoever asks first
    (the generation tests, every fusion; the `vlm serve` and chat tests, the projector)."""
    from vlm.config import load_config
    from vlm.train import train

    runs: dict[tuple[str, ...], Path] = {}

    def trained(overrides: list[str]) -> Path:
        if tuple(overrides) not in runs:
            out = tmp_path_factory.mktemp("gen-" + "-".join(o.split("=")[-1] for o in overrides[:1]))
            config = load_config(None, [
                f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", *overrides,
                f"data.train_files=[{captions_file}]", "train.stage=finetune", "train.max_steps=120",
                "train.batch_size=8", "train.lr=1e-3", "train.fusion_lr=3e-3", "train.warmup_steps=5",
                "train.report_to=none", "train.seed=0", f"output_dir={out}",
            ])
            torch.manual_seed(0)
            train(config)
            runs[tuple(overrides)] = out
        return runs[tuple(overrides)]

    return trained


@pytest.fixture(scope="session")
def model_config(backbones: dict[str, Path]):
    from vlm.config import ModelConfig

    return ModelConfig(vision=str(backbones["vit"]), lm=str(backbones["lm"])).with_fusion("projector", type="mlp2x_gelu")


@pytest.fixture()
def tiny_vlm(model_config):
    from vlm.model import VLM

    torch.manual_seed(0)
    return VLM.from_config(model_config)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A dual-tower CLIP checkpoint folder: only its vision half must be loaded."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip")
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
