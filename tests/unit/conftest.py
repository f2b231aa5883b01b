"""tests/unit builds no backbones (`make test-fast`): a test that needs a VLM gets untrained tiny ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm.config import ModelConfig


@pytest.fixture(scope="session")
def backbones() -> dict[str, Path]:
    """Overrides the pre-trained ones of tests/conftest.py, so any unit test asking for them (or for
    `model_config`, `tiny_vlm`, `trained_run`, ...) fails at once instead of slowing `make test-fast`."""
    pytest.fail("tests/unit builds no backbones (make test-fast): use `untrained_model_config`, or move the "
                "test to tests/integration", pytrace=False)


def untrained_backbones(out: Path, seed: int = 0) -> dict[str, Path]:
    """`out/vit` (timm local-dir) and `out/lm` (transformers, a 2-layer Llama whose byte-level BPE
    tokenizer learnt a 400-token vocabulary from 300 sentences), randomly initialised: under a second."""
    import timm
    from timm.models import save_for_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.embedded.pretrain import IMAGE_SIZE
    from vlm.embedded.tiny_backbones import LM_CONFIG, VIT_ARCH, VIT_ARGS, build_tokenizer, english_text

    torch.manual_seed(seed)
    paths = {"vit": out / "vit", "lm": out / "lm"}
    vit = timm.create_model(VIT_ARCH, pretrained=False, num_classes=0, **VIT_ARGS)
    save_for_hf(vit, str(paths["vit"]), safe_serialization=True, data_config={
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    tokenizer = build_tokenizer(english_text(300, seed), vocab_size=400)
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    lm_config = LlamaConfig(vocab_size=len(tokenizer), **special, **{**LM_CONFIG, "num_hidden_layers": 2})
    LlamaForCausalLM(lm_config).save_pretrained(paths["lm"])
    tokenizer.save_pretrained(paths["lm"])
    return paths


@pytest.fixture(scope="session")
def untrained_model_config(tmp_path_factory: pytest.TempPathFactory) -> ModelConfig:
    """A projector (mlp2x_gelu) VLM's model config over `untrained_backbones`."""
    paths = untrained_backbones(tmp_path_factory.mktemp("untrained-backbones"))
    return ModelConfig(vision=str(paths["vit"]), lm=str(paths["lm"])).with_fusion("projector", type="mlp2x_gelu")
