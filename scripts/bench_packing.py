"""Padding share and training tokens/s, packed (`data.packing`) vs unpacked, on the same batches, in one run.

Two copies of one model (same weights, AdamW each) take training steps in turn on the same
`batch_size` samples per step: one collated as padded rows (the Collator), one packed into rows of up
to `data.max_length` (the PackingCollator). Alternating step by step keeps machine noise from
favouring either. Before timing, the two losses on the first batch must agree (fp32: 1e-5).
Reported: padding share (padding positions / all positions), positions per step, median step time,
and tokens/s = real (non-padding) tokens per second of training step.

    python scripts/bench_packing.py configs/quickstart.yaml                    # the quickstart data
    python scripts/bench_packing.py configs/quickstart.yaml --long-tail 2000   # LLaVA-665k-like lengths
    python scripts/bench_packing.py configs/quickstart.yaml --long-tail 2000 --max-length 2048 --steps 8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.config import load_config  # noqa: E402
from vlm.data.collator import Collator  # noqa: E402
from vlm.data.dataset import ConversationDataset  # noqa: E402
from vlm.data.packing import PackingCollator, padding_share  # noqa: E402
from vlm.embedded.long_tail import make_long_tail_dataset  # noqa: E402
from vlm.factory import build  # noqa: E402


def step(model, optimizer, batch) -> tuple[float, float]:
    """One training step; returns (seconds, loss)."""
    inputs = batch.forward_inputs(model.vision, cached=False, device=torch.device("cpu"))
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--long-tail", type=int, default=0, help="generate this many LLaVA-665k-like samples")
    parser.add_argument("--out", default="artifacts/bench_packing")
    parser.add_argument("--max-length", type=int, default=None, help="default: the config's data.max_length")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = load_config(args.config)
    data = config.data
    if args.long_tail:
        files = [str(make_long_tail_dataset(Path(args.out) / "long_tail", args.long_tail, seed=args.seed))]
        data = dataclasses.replace(data, train_files=files, truncate_text=True)
    if args.max_length:
        data = dataclasses.replace(data, max_length=args.max_length)
    batch_size = args.batch_size or config.train.batch_size
    torch.manual_seed(args.seed)
    model, processor = build(config.model, data)
    model.vision.set_frozen(True)
    dataset = ConversationDataset.from_files(data.train_files, processor, data.image_root, data=data)
    models = {"unpacked": model, "packed": copy.deepcopy(model)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    collate = {"unpacked": Collator(model.tokenizer.pad_token_id), "packed": PackingCollator(
        model.tokenizer.pad_token_id, data.max_length, data.packing_max_images)}
    rng = random.Random(args.seed)
    stats = {k: {"time": [], "tokens": [], "positions": [], "padding": [], "rows": []} for k in models}
    for i in range(args.warmup + args.steps):
        items = [dataset[j] for j in rng.sample(range(len(dataset)), batch_size)]
        order = ("unpacked", "packed") if i % 2 == 0 else ("packed", "unpacked")
        losses = {}
        for name in order:
            batch = collate[name](items)
            seconds, losses[name] = step(models[name], optimizers[name], batch)
            if i >= args.warmup:
                s = stats[name]
                s["time"].append(seconds)
                s["tokens"].append(int(batch.attention_mask.sum()))
                s["positions"].append(batch.attention_mask.numel())
                s["padding"].append(padding_share(batch))
                s["rows"].append(batch.input_ids.shape[0])
        if i == 0 and abs(losses["packed"] - losses["unpacked"]) > 1e-5 * max(1.0, abs(losses["unpacked"])):
            raise SystemExit(f"packed and unpacked losses differ on the first batch: {losses}")
    name = "long-tail mix" if args.long_tail else "config data"
    print(f"{name}: {len(dataset)} samples, batch {batch_size}, max_length {data.max_length}, "
          f"{args.steps} timed steps (alternating), fusion {config.model.fusion}")
    print("| batches | padding share | rows x length per step | median step (s) | tokens/s |")
    print("|---|---|---|---|---|")
    rate = {}
    for key, s in stats.items():
        median = statistics.median(s["time"])
        rate[key] = sum(s["tokens"]) / sum(s["time"])
        print(f"| {key} | {1 - sum(s['tokens']) / sum(s['positions']):.1%} | "
              f"{statistics.mean(s['rows']):.1f} x {sum(s['positions']) / sum(s['rows']):.0f} | {median:.3f} | "
              f"{rate[key]:.0f} |")
    print(f"packed / unpacked tokens/s: {rate['packed'] / rate['unpacked']:.2f}x")


if __name__ == "__main__":
    main()
