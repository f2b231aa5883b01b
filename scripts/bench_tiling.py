"""Does tiling help where small details decide the answer, and what does it cost? (docs/tiling.md)

    python scripts/bench_tiling.py [--steps 300] [--out artifacts/bench_tiling]

Builds the high-resolution synthetic data (256 px images of one small object, a blob of a few pixels once
the image is shrunk to the tiny tower's 64 px; asked its shape and its colour), trains the quickstart recipe twice for the
same steps with the project's trainer, without tiling and with `data.tiling.max_tiles=4` (a 2x2 grid plus
the thumbnail), answers every test question with `vlm.eval.predict` and scores it with `vlm.eval.metrics`.
Step cost is measured alternately on the two trained models (forward + backward of the same 16 samples,
median of --repeats), so a busy machine slows both alike; it is reported as a ratio.
Writes `results.md` and `results.json` under --out. Uses the quickstart's tiny backbones (built when missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlm.config import load_config
from vlm.data.collator import Collator
from vlm.data.dataset import ConversationDataset
from vlm.eval.predict import evaluate_predictions, predict
from vlm.factory import load
from vlm.train.loop import train
from vlm.embedded.synthetic import make_hires_dataset
from vlm.embedded.tiny_backbones import make_tiny_backbones

VARIANTS = {"no tiling": 0, "tiling (max_tiles 4)": 4}


def train_variant(args: argparse.Namespace, data: dict[str, Path], name: str, max_tiles: int) -> tuple[Path, float]:
    """Train one variant with the quickstart recipe; returns its final/ folder and the training wall time."""
    out = args.out / ("tiled" if max_tiles else "plain")
    overrides = [
        f"model.vision={args.backbones / 'vit'}", f"model.lm={args.backbones / 'lm'}",
        f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['eval']}]",
        f"data.tiling.max_tiles={max_tiles}", f"train.max_steps={args.steps}", f"train.seed={args.seed}",
        "train.eval_every=0", "train.report_to=none", f"output_dir={out}",
    ]
    start = time.perf_counter()
    train(load_config(args.config, overrides))
    return out / "final", time.perf_counter() - start


def step_seconds(folders: dict[str, Path], data: Path, repeats: int) -> dict[str, float]:
    """Median forward + backward seconds of the same 16 training samples per variant, run alternately."""
    runs = {}
    for name, folder in folders.items():
        model, processor = load(folder)
        model.train()
        dataset = ConversationDataset.from_files([str(data)], processor)
        items = [dataset[i] for i in range(16)]
        runs[name] = (model, Collator(processor.tokenizer.pad_token_id)(items).model_inputs())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, inputs) in runs.items():
            start = time.perf_counter()
            model(**inputs).loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_tiling"))
    parser.add_argument("--backbones", type=Path, default=Path("artifacts/quickstart/backbones"))
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the recipe both variants train with")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    if not (args.backbones / "lm" / "config.json").is_file():
        make_tiny_backbones(args.backbones)
    data = make_hires_dataset(args.out / "data", args.train_images, 32, args.test_images, seed=args.seed)

    rows, folders = [], {}
    for name, max_tiles in VARIANTS.items():
        folder, train_s = train_variant(args, data, name, max_tiles)
        folders[name] = folder
        model, processor = load(folder)
        preds = args.out / f"{folder.parent.name}.predictions.jsonl"
        predict(model, processor, data["test"], preds, max_new_tokens=8, batch_size=32)
        vqa = evaluate_predictions(preds, data["test"])["vqa"]
        rows.append({
            "variant": name, "max_tiles": max_tiles, "image_tokens": processor.image_tokens(256, 256),
            "shape": vqa["per_type"]["shape"]["accuracy"], "colour": vqa["per_type"]["colour"]["accuracy"],
            "vqa": vqa["accuracy"], "questions": vqa["count"], "train_s": train_s,
        })
    seconds = step_seconds(folders, data["train"], args.repeats)
    base = seconds[rows[0]["variant"]]
    for row in rows:
        row["step_ms"], row["step_ratio"] = seconds[row["variant"]] * 1e3, seconds[row["variant"]] / base

    lines = [
        f"{args.steps} steps each, batch 16, seed {args.seed}; {rows[0]['questions']} test questions "
        f"({args.test_images} images); wall {time.perf_counter() - started:.0f} s",
        "",
        "| variant | LM positions per 256 px image | shape acc | colour acc | VQA acc | train wall (s) "
        "| fwd+bwd per batch (ms, median) | step-time ratio |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['image_tokens']} | {r['shape']:.1%} | {r['colour']:.1%} | {r['vqa']:.1%} "
          f"| {r['train_s']:.0f} | {r['step_ms']:.0f} | {r['step_ratio']:.2f} |" for r in rows),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
