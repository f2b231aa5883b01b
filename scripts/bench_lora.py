"""Step time and trainable parameters of full fine-tuning vs LoRA variants, measured in one run.

Each variant is the quickstart model (`configs/quickstart.yaml`, built from the same backbones and
seed) with its own `train.*` overrides. After warm-up the variants take optimizer steps in turn on
the same batch of `--batch-size` training samples, so machine noise favours none; the median step
time of each is printed with its trainable parameter count (the table in docs/lora.md).

    python scripts/bench_lora.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.factory import build
from vlm.train.freezing import apply_stage
from vlm.train.optim import build_optimizer

QUICKSTART, RECIPE = "configs/quickstart.yaml", "configs/recipes/lora.yaml"
VARIANTS = {  # name: (config file, overrides)
    "full fine-tune": (QUICKSTART, []),
    "LoRA r16, vocabulary frozen": (QUICKSTART, ["train.lora.enabled=true", "train.lora.train_new_tokens=false"]),
    "LoRA r16, new tokens train": (QUICKSTART, ["train.lora.enabled=true"]),
    "LoRA recipe": (RECIPE, []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    runs = {}
    for name, (config_file, overrides) in VARIANTS.items():
        config = load_config(config_file, overrides)
        torch.manual_seed(config.train.seed)
        model, processor = build(config.model, config.data)
        apply_stage(model, config.train)
        model.train()
        samples = read_samples(config.data.train_files[0], config.data.image_root)[0][: args.batch_size]
        batch = Collator(model.tokenizer.pad_token_id)([processor(s) for s in samples])
        inputs = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runs[name] = (model, build_optimizer(model, config), inputs, trainable, [])

    def step(model, optimizer, inputs) -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup + args.steps):
        for model, optimizer, inputs, _, times in runs.values():
            start = time.perf_counter()
            step(model, optimizer, inputs)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)

    print(f"| variant | trainable parameters | median step ms (batch {args.batch_size}) |\n|---|---|---|")
    for name, (_, _, _, trainable, times) in runs.items():
        print(f"| {name} | {trainable:,} | {1000 * statistics.median(times):.0f} |")


if __name__ == "__main__":
    main()
