"""Per-rank memory of the trainable state under each strategy, on 2 CPU processes (gloo).

    python scripts/bench_sharding.py [--config configs/quickstart.yaml] [--strategies ddp,fsdp2,zero2,zero3]

Each strategy runs in its own `torchrun --nproc_per_node 2` launch (so peak RSS is its own), builds the
model through the training code (`Trainer.setup`: `build_model`, `build_strategy`, `Strategy.setup`), runs a few real
optimizer steps, and measures on each rank what that rank holds for the *trainable* parameters:

- parameters: local storage of trainable parameters (an FSDP2 shard, a ZeRO-3 partition, or whole);
- gradients: local gradient storage after the last backward (DDP / FSDP2: `param.grad`; DeepSpeed keeps
  reduced gradients in its own flat fp32 partitions, which are measured instead);
- optimizer: every tensor in the optimizer state, plus DeepSpeed's fp32 master partitions;
- peak RSS of the process (everything: frozen tower, activations, libraries).

Prints a Markdown table and the ratio of each strategy's trainable state to DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def local_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 parameter: this rank's partition
        tensor = tensor.ds_tensor
    if hasattr(tensor, "to_local"):  # an FSDP2 DTensor shard
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def deepspeed_partitions(optimizer: object) -> list[torch.Tensor]:
    """DeepSpeed's fp32 master partitions (ZeRO-2: single_partition_of_fp32_groups, ZeRO-3: fp32_partitioned_groups_flat)."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        found = getattr(optimizer, name, None)
        if found:
            return list(found)
    return []


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from vlm.config import load_config
    from vlm.train.distributed import init_distributed
    from vlm.train.loop import Trainer
    from vlm.train.signals import StopRequest

    torch.set_num_threads(1)
    env = init_distributed()
    config = load_config(args.config, [f"train.strategy={args.strategy}", f"train.batch_size={args.batch_size}",
                                       "train.report_to=none", f"output_dir={args.tmp}"])
    trainer = Trainer(config, env)
    trainer.setup()
    strategy, batches = trainer.strategy, trainer.batches()
    grad_bytes = 0
    trainable = [p for p in strategy.unwrapped().parameters() if p.requires_grad]
    for step in range(args.steps):
        if step == args.steps - 1:  # measure gradients between the last backward and its update
            original = strategy.step

            def measuring_step(max_norm: float) -> float:
                nonlocal grad_bytes
                grad_bytes = sum(local_bytes(p.grad) for p in trainable if p.grad is not None)
                partitions = deepspeed_partitions(getattr(strategy, "engine", None) and strategy.engine.optimizer)
                grad_bytes += sum(t.numel() * t.element_size() for t in partitions)  # ZeRO reduces into these
                return original(max_norm)

            strategy.step = measuring_step
        trainer.step(*next(batches), StopRequest())
    optimizer_bytes = sum(local_bytes(t) for s in strategy.optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t) and t.ndim > 0)
    engine_optimizer = getattr(strategy, "engine", None) and strategy.engine.optimizer
    optimizer_bytes += sum(t.numel() * t.element_size() for t in deepspeed_partitions(engine_optimizer))
    row = {
        "rank": env.rank, "params": sum(local_bytes(p) for p in trainable), "grads": grad_bytes,
        "optimizer": optimizer_bytes, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    rows = [None] * env.world_size
    dist.all_gather_object(rows, row)
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def launch(strategy: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"{strategy}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--worker", "--strategy", strategy, "--config", args.config,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--out", str(out),
           "--tmp", str(tmp / strategy)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{strategy} failed:\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--strategies", default="ddp,fsdp2,zero2,zero3")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    mib = 1024 * 1024
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            results[strategy] = launch(strategy, args, Path(tmp))
            print(f"{strategy}: done", file=sys.stderr, flush=True)
    base = max(r["params"] + r["grads"] + r["optimizer"] for r in results.get("ddp", results[next(iter(results))]))
    print("| strategy | params / rank (MiB) | grads / rank (MiB) | optimizer / rank (MiB) | trainable state / rank "
          "(MiB) | vs DDP | peak RSS / rank (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for strategy, rows in results.items():
        worst = max(rows, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
        total = worst["params"] + worst["grads"] + worst["optimizer"]
        rss = max(r["peak_rss"] for r in rows)
        print(f"| {strategy} | {worst['params'] / mib:.2f} | {worst['grads'] / mib:.2f} | "
              f"{worst['optimizer'] / mib:.2f} | {total / mib:.2f} | {total / base:.2f}x | {rss / mib:.0f} |")
    print(f"(2 CPU processes over gloo, config {args.config}, batch {args.batch_size} per rank, "
          f"{args.steps} steps; per strategy the larger of the two ranks)")


if __name__ == "__main__":
    main()
