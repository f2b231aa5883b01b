"""Shared fixtures: tiny backbones and synthetic data, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
