"""`train.mixed_precision: bf16` on a CPU trains under bf16 autocast (CPUs with AVX512-BF16 / AMX run it
natively): the losses follow fp32's closely but not bit for bit, and the weights stay fp32."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from vlm.config import load_config
from vlm.train import train


def run(backbones, synthetic, out, precision: str) -> list[float]:
    train(load_config(None, [
        f"model.vision={backbones['vit']}", f"model.lm={backbones['lm']}", f"data.train_files=[{synthetic['train']}]",
        "train.max_steps=3", "train.batch_size=4", "train.lr=1e-3", "train.report_to=none",
        f"train.mixed_precision={precision}", f"output_dir={out}",
    ]))
    return [h["loss"] for h in json.loads((out / "train_summary.json").read_text())["history"]]


def test_bf16_on_cpu_follows_fp32_closely_but_not_exactly(backbones, synthetic, tmp_path):
    fp32 = run(backbones, synthetic, tmp_path / "fp32", "auto")  # auto: fp32 on a CPU
    bf16 = run(backbones, synthetic, tmp_path / "bf16", "bf16")
    differences = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16)]
    assert max(differences) < 3e-2, differences
    assert max(differences) > 1e-5, "bf16 autocast did not engage: the losses are fp32's"
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
