"""bf16 autocast against fp32 on the CPU: forward + backward time of one training batch, and the loss difference.

The model is built from a training config exactly as `vlm train` builds it (stage, LoRA, fusion), one batch of
`train.batch_size` samples comes from `data.train_files`, and the same model takes a forward + backward in
fp32 and under `torch.autocast("cpu", bfloat16)` (what `train.mixed_precision: bf16` does) in turn, so machine
noise favours neither; gradients are cleared after each, no weight changes. Reports median ms per pass, the
ratio bf16 / fp32 and |loss_bf16 - loss_fp32|.

    python scripts/bench_cpu_bf16.py configs/real.yaml --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import load_config  # noqa: E402
from vlm.data.collator import Collator  # noqa: E402
from vlm.data.dataset import ConversationDataset  # noqa: E402
from vlm.train.loop import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=8, help="timed passes per precision (after one warm-up each)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model, processor = build_model(config)
    model.train()
    dataset = ConversationDataset.from_files(config.data.train_files, processor, config.data.image_root, data=config.data)
    batch = Collator(model.tokenizer.pad_token_id)([dataset[i] for i in range(config.train.batch_size)]).model_inputs()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(bf16: bool) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        elapsed = time.perf_counter() - start
        for p in params:
            p.grad = None
        return elapsed, float(loss)

    times: dict[bool, list[float]] = {False: [], True: []}
    losses: dict[bool, float] = {}
    for i in range(args.steps + 1):
        for bf16 in (False, True):
            elapsed, losses[bf16] = step(bf16)
            if i:  # the first pass of each is warm-up
                times[bf16].append(elapsed)
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    shape = tuple(batch["input_ids"].shape)
    print(f"config={args.config} batch={shape} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"trainable={sum(p.numel() for p in params):,}")
    print(f"fp32: {fp32 * 1000:.0f} ms/pass  bf16 autocast: {bf16 * 1000:.0f} ms/pass  ratio bf16/fp32 {bf16 / fp32:.3f}")
    print(f"loss fp32 {losses[False]:.5f}  bf16 {losses[True]:.5f}  |diff| {abs(losses[True] - losses[False]):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
