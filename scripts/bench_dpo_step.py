"""Step time and peak memory of a DPO step against an SFT step on the same batch, for the three reference choices.

The quickstart model (`configs/quickstart.yaml`, tiny backbones, full fine-tune) takes real optimizer steps
(`vlm.train.step.train_step` with the `single` strategy) on one batch of `--pairs` preference pairs from the
embedded preference task (vlm/embedded/preference.py):
  sft              the pairs' chosen conversations, next-token loss (the same images and prompts)
  dpo-copy         DPO, the reference a frozen copy of the model
  dpo-precomputed  DPO, the reference's log-probabilities computed once before (no reference model)
  sft-lora / dpo-adapters  the same with LoRA r16 on the LM and only the adapters training; DPO's reference is
                   the LM with its adapters disabled
Time: after warm-up the variants step in turn, so machine noise favours none; medians. Memory: each variant
alone in a fresh process (`--only NAME`), its peak resident set (ru_maxrss) after `--steps` steps.

    python scripts/bench_dpo_step.py --steps 20        # time, all variants in one process
    python scripts/bench_dpo_step.py --memory          # peak RSS, one process per variant
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.formats import read_samples
from vlm.embedded.preference import write_preference_data
from vlm.train.distributed import init_distributed
from vlm.train.final import build_model
from vlm.train.objective import DPO, SFT
from vlm.train.optim import Updater, build_optimizer
from vlm.train.reference import AdaptersOff, FrozenCopy, Precomputed
from vlm.train.sharding import build_strategy
from vlm.train.state import TrainState
from vlm.train.step import train_step

LORA = ["train.lora.enabled=true", "train.lora.train_new_tokens=false", "train.stage=custom",
        "train.freeze.vision=true", "train.freeze.fusion=true", "train.freeze.lm=false"]
VARIANTS = {"sft": [], "dpo-copy": [], "dpo-precomputed": [], "sft-lora": LORA, "dpo-adapters": LORA}


def build(name: str, pairs_file: Path, pairs: int):
    """(strategy, updater, batch, objective) of one variant, from the same seed and the same first `pairs` pairs."""
    config = load_config("configs/quickstart.yaml", [*VARIANTS[name], "train.report_to=none", "train.max_steps=1000",
                                                     "train.warmup_steps=0"])
    torch.manual_seed(0)
    env = init_distributed()
    model, processor = build_model(config)
    samples = read_samples(pairs_file)[0][:pairs]
    if name.startswith("sft"):
        samples = [dataclasses.replace(s, rejected=None) for s in samples]
    batch = Collator(model.tokenizer.pad_token_id)([processor(s) for s in samples])
    reference = FrozenCopy(model, env.device) if name == "dpo-copy" else None
    strategy = build_strategy(config, env)
    if name == "dpo-precomputed":
        with torch.no_grad():
            from vlm.train.dpo import sequence_logps
            logps = sequence_logps(model(**batch.model_inputs(), num_items_in_batch=1).logits, batch.labels)[0]
        reference = Precomputed({sid: (float(logps[k]), float(logps[pairs + k])) for k, sid in enumerate(batch.ids)})
    strategy.setup(model, lambda m: build_optimizer(m, config))
    objective = SFT() if name.startswith("sft") else DPO(config.train.dpo, reference or AdaptersOff())
    return strategy, Updater(strategy, config, save=lambda: Path(".")), batch, objective, env


def step(strategy, updater, batch, objective, env, state) -> None:
    train_step(strategy, updater, state, [batch], env, False, False, objective)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--memory", action="store_true", help="peak RSS per variant, each in its own process")
    parser.add_argument("--only", choices=list(VARIANTS), help="(internal) run one variant and print its peak RSS")
    parser.add_argument("--data", type=Path, default=Path("artifacts/preference/data"))
    args = parser.parse_args()
    files = write_preference_data(Path("artifacts/quickstart/data"), args.data)
    if args.memory:
        print(f"| variant | peak RSS MB ({args.steps} steps, {args.pairs} pairs) |\n|---|---|")
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--pairs",
                                  str(args.pairs), "--data", str(args.data)], capture_output=True, text=True, check=True)
            print(f"| {name} | {json.loads(out.stdout.splitlines()[-1])['peak_rss_mb']:,.0f} |")
        return
    names = [args.only] if args.only else list(VARIANTS)
    runs = {name: (*build(name, files["pairs"], args.pairs), TrainState(), []) for name in names}
    for i in range(args.warmup + args.steps):
        for strategy, updater, batch, objective, env, state, times in runs.values():
            start = time.perf_counter()
            step(strategy, updater, batch, objective, env, state)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    if args.only:
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    base = statistics.median(runs["sft"][-1])
    print(f"| variant | median step ms ({args.pairs} pairs) | x SFT |\n|---|---|---|")
    for name, run in runs.items():
        median = statistics.median(run[-1])
        print(f"| {name} | {1000 * median:.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
