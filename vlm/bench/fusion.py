"""`vlm bench fusion`: train every fusion strategy on the same data, steps, seed and backbones, then
compare accuracy (per question type, and with images dropped at given rates), cost and memory.

Each strategy runs in its own Python process, so its peak memory is its own and a crash in one
(bad config, out of memory) is written into its row while the others still run. Results are
rewritten after every strategy: DIR/results.csv, DIR/results.md and DIR/fusion.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..embedded.synthetic import QUESTION_TYPES
from ..progress import progress_bar


STRATEGY_OVERRIDES: dict[str, list[str]] = {
    "early": ["model.fusion=early"],
    "projector": ["model.fusion=projector"],
    "resampler": ["model.fusion=resampler", "model.resampler.latents=16"],
    "cross_attention": ["model.fusion=cross_attention", "model.cross_attention.every_n_layers=1"],
    "late": ["model.fusion=late"],
}
"""Per-strategy settings applied before the user's overrides; any other name means `model.fusion=<name>`."""


def strategy_overrides(strategy: str) -> list[str]:
    return list(STRATEGY_OVERRIDES.get(strategy, [f"model.fusion={strategy}"]))


def default_test_file(config: Any) -> str:
    """`test.json` beside the first training file (the quickstart layout), else the first eval file."""
    if config.data.train_files:
        test = Path(config.data.train_files[0]).with_name("test.json")
        if test.is_file():
            return str(test)
    if config.data.eval_files:
        return config.data.eval_files[0]
    raise ValueError("No test data: pass --data, or set data.eval_files in the config.")


def run_strategy(job: dict[str, Any]) -> dict[str, Any]:
    """Train one strategy, then predict + score the test file at each image-drop rate (in this process)."""
    import torch

    from ..config import load_config
    from ..eval.predict import evaluate_predictions, predict
    from ..factory import load
    from ..train import train
    from ..train.freezing import apply_stage

    out = Path(job["out"])
    overrides = [*strategy_overrides(job["strategy"]), "train.eval_every=0", "train.report_to=none"]
    if job.get("steps"):
        overrides.append(f"train.max_steps={job['steps']}")
    config = load_config(job["config"], [*overrides, *job.get("overrides", []), f"output_dir={out}"])
    summary = train(config)
    model, processor = load(out / "final")
    apply_stage(model, config.train.stage)
    modules = [model.fusion, model.lm] + ([model.vision] if model.fusion.reads_encoder_features else [])
    params = [p for module in modules for p in module.parameters()]
    row: dict[str, Any] = {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "train_steps": summary["steps"],
        "step_ms": 1000 * summary["train_seconds"] / max(summary["steps"], 1),
        "final_loss": summary["final_loss"],
    }
    image_root = job.get("image_root") or config.data.image_root
    for rate in job["image_drop"]:
        started = time.perf_counter()
        preds = out / f"predictions_drop{rate:g}.jsonl"
        predict(model, processor, job["data"], preds, image_root, job["max_new_tokens"], job["batch_size"],
                image_drop=rate, seed=config.train.seed)
        metrics = evaluate_predictions(preds, job["data"])
        seconds = time.perf_counter() - started
        row[f"acc_drop_{rate:g}"] = metrics.get("vqa", {}).get("accuracy", math.nan)
        if rate == job["image_drop"][0]:  # the first rate (0 by default) gives the per-type figures
            row["eval_s"] = seconds
            row["vqa_acc"] = metrics.get("vqa", {}).get("accuracy", math.nan)
            for name, value in metrics.get("vqa", {}).get("per_type", {}).items():
                row[f"acc_{name}"] = value["accuracy"]
            row["caption_cider"] = metrics.get("caption", {}).get("cider_d", math.nan)
    if torch.cuda.is_available():
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        row["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def _error_of(log: str, returncode: int) -> str:
    """The exception line of a failed run's log (its last line when there is none)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or [f"exit status {returncode}"])[-1][:300]


def columns(image_drop: list[float], rows: list[dict[str, Any]]) -> list[str]:
    """CSV / table columns: question types first (any extra types found after the usual five)."""
    extra = sorted({k[4:] for r in rows for k in r if k.startswith("acc_") and not k.startswith("acc_drop_")}
                   - set(QUESTION_TYPES))
    return [
        "strategy", "status", *(f"acc_{t}" for t in (*QUESTION_TYPES, *extra)), "vqa_acc", "caption_cider",
        *(f"acc_drop_{r:g}" for r in image_drop), "trainable_params", "total_params", "step_ms", "peak_mem_mb",
        "eval_s", "wall_s", "train_steps", "final_loss", "error",
    ]


def write_results(out: Path, rows: list[dict[str, Any]], image_drop: list[float], header: str) -> None:
    """DIR/results.csv, DIR/results.md and DIR/fusion.png from the rows so far."""
    cols = columns(image_drop, rows)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in cols if c not in ("train_steps", "final_loss")]
    lines = [header, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(c, r.get(c, "")) for c in shown) + " |" for r in rows]
    lines += ["", "acc_*: VQA accuracy on the test questions (acc_drop_R: each image dropped with probability R); "
              "caption_cider: CIDEr-D of the captions; step_ms: mean training step time; peak_mem_mb: the "
              "strategy's process peak (RSS on CPU, allocated CUDA memory on GPU); eval_s: predict + score at "
              f"drop rate {image_drop[0]:g}. Params exclude a vision tower the strategy never runs.", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot(out / "fusion.png", rows, image_drop)


def _fmt(column: str, value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if column.startswith("acc") or column == "vqa_acc":
            return f"{value:.1%}"
        return f"{value:.2f}" if column == "caption_cider" else f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if isinstance(value, int) and column.endswith("params"):
        return f"{value:,}"
    return str(value).replace("|", "/")


def plot(path: Path, rows: list[dict[str, Any]], image_drop: list[float]) -> None:
    """Accuracy vs image-drop rate, one line per strategy that finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row.get("status") == "ok":
            ax.plot(image_drop, [100 * row.get(f"acc_drop_{r:g}", math.nan) for r in image_drop], marker="o",
                    label=row["strategy"])
    ax.set_xlabel("image-drop rate at evaluation")
    ax.set_ylabel("VQA accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(image_drop)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Fusion strategies with missing images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_fusion(
    config: str, strategies: list[str], image_drop: list[float], out: str | Path, steps: int | None = None,
    overrides: list[str] = (), data: str | None = None, image_root: str | None = None,
    max_new_tokens: int = 24, batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Run every strategy in its own process, one after another; returns the result rows."""
    from ..config import load_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(config, list(overrides))
    data = data or default_test_file(base)
    image_drop = [float(r) for r in image_drop]
    if not image_drop or any(not 0 <= r <= 1 for r in image_drop):
        raise ValueError(f"--image-drop rates must be in [0, 1], got {image_drop}.")
    header = (f"Fusion benchmark: config `{config}`, {steps or base.train.max_steps} steps, batch "
              f"{base.train.batch_size}, seed {base.train.seed}, test data `{data}`; overrides: "
              f"{' '.join(overrides) or 'none'}.")
    rows: list[dict[str, Any]] = []
    for strategy in (progress := progress_bar(strategies, desc="bench fusion", unit="strategy", every=1)):
        progress.set_postfix(strategy=strategy)
        run_dir = out / strategy
        run_dir.mkdir(parents=True, exist_ok=True)
        job = {"strategy": strategy, "config": config, "out": str(run_dir), "steps": steps,
               "overrides": list(overrides), "data": data, "image_root": image_root, "image_drop": image_drop,
               "max_new_tokens": max_new_tokens, "batch_size": batch_size}
        started = time.perf_counter()
        with (run_dir / "bench.log").open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "vlm.bench.fusion", "--job", json.dumps(job)],
                                  stdout=log, stderr=subprocess.STDOUT)
        result_file = run_dir / "bench.json"
        row: dict[str, Any] = {"strategy": strategy}
        if proc.returncode == 0 and result_file.is_file():
            row.update(json.loads(result_file.read_text()), status="ok")
        else:
            row.update(status="failed", error=_error_of((run_dir / "bench.log").read_text(), proc.returncode))
            progress.write(f"{strategy}: failed ({row['error']}); log in {run_dir / 'bench.log'}")
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        write_results(out, rows, image_drop, header)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m vlm.bench.fusion --job JSON` runs one strategy, writes bench.json."""
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    job = json.loads(parser.parse_args(argv).job)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    row = run_strategy(job)
    (Path(job["out"]) / "bench.json").write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
