"""Padding share of a batch with and without `data.group_by_length`, on a config's training data.

    python scripts/measure_length_grouping.py configs/quickstart.yaml [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlm.config import load_config
from vlm.data.mixture import read_files
from vlm.data.samplers import LengthGroupedSampler, estimate_lengths
from vlm.factory import build_processor


def padding_share(order: list[int], lengths: list[int], batch_size: int) -> float:
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.config)
    processor = build_processor(config.model, config.data)
    samples, _ = read_files(config.data.train_files, config.data.image_root, config.data)
    started = time.perf_counter()
    estimated = estimate_lengths(samples, processor)
    estimate_s = time.perf_counter() - started
    exact = [len(processor(s, with_pixels=False)["input_ids"]) for s in samples]
    shuffled = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = list(LengthGroupedSampler(estimated, args.batch_size, seed=0))
    print(f"{len(samples)} samples, tokens per sample {min(exact)}-{max(exact)}; length estimate {estimate_s:.2f}s")
    print(f"padding share, batch {args.batch_size}: shuffled {padding_share(shuffled, exact, args.batch_size):.1%}, "
          f"group_by_length {padding_share(grouped, exact, args.batch_size):.1%}")


if __name__ == "__main__":
    main()
