"""One `vlm bench fusion` job, in its own process: train (or not), then score every test condition.

`python -m vlm.bench.fusion_worker --job JSON` writes `bench.json` into the job's folder. A job
trains one strategy under one regime, image-dropout rate and seed until its eval loss stops
improving (or the step cap), scores the in-memory model at the equal step budget on the way,
then loads `final/` and answers every condition's test file. `text_only` jobs train with every
image removed and are scored with every image removed; `base_lm` jobs do not train at all.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..eval.metrics import vqa_accuracy

EVIDENCE_GROUPS = ("image", "note", "redundant", "complementary")
"""Evidence sources scored as accuracy; `conflict` items are scored as which modality was followed."""


def score(predictions: Path, records: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy overall, per evidence source and per question type; for conflict items the share of
    answers that follow the image and the share that follow the note."""
    answers = {}
    for line in predictions.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            answers[item["id"]] = item["prediction"]
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records:
        prediction = answers.get(record["id"], "")
        if record["evidence"] == "conflict":
            groups["trust_image"].append(vqa_accuracy(prediction, record["answers"]))
            groups["trust_note"].append(vqa_accuracy(prediction, [record["note_answer"]]))
            continue
        correct = vqa_accuracy(prediction, record["answers"])
        groups["all"].append(correct)
        groups[record["evidence"]].append(correct)
        groups[f"type_{record['type']}"].append(correct)
    means = {name: sum(values) / len(values) for name, values in groups.items() if values}
    return {**means, "n_conflict": len(groups["trust_image"])} if groups["trust_image"] else means


def evaluate(model: Any, processor: Any, job: dict[str, Any], conditions: list[str], out: Path) -> dict[str, Any]:
    """Answer each condition's test file; returns {condition: score dict} plus the seconds taken."""
    from ..eval.predict import predict

    started = time.perf_counter()
    scores: dict[str, Any] = {}
    blind = job["kind"] != "vlm"  # text-only and base-LM rows never see an image
    for name in conditions:
        spec = job["conditions"][name]
        preds = out / "predictions" / f"{name}.jsonl"
        predict(model, processor, spec["file"], preds, None, job["max_new_tokens"], job["eval_batch_size"],
                image_drop=1.0 if blind else spec["image_drop"], seed=job["seed"],
                dropped_image="remove" if blind else job.get("dropped_image", "remove"))
        scores[name] = score(preds, json.loads(Path(spec["file"]).read_text()))
    return {"scores": scores, "eval_s": time.perf_counter() - started}


def trainable_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of what the strategy runs: the tower only where it reads it."""
    modules = [model.fusion, model.lm] + ([model.vision] if model.fusion.reads_encoder_features else [])
    params = [p for module in modules for p in module.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def text_loss(model: Any, processor: Any, lines: list[str]) -> float:
    """The LM's own next-token loss on held-out plain text (no image, no chat template)."""
    from ..embedded.tiny_backbones import lm_loss

    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    return lm_loss(lm, processor.tokenizer, lines)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from ..config import load_config
    from ..embedded.synthetic import text_corpus
    from ..factory import load
    from ..train import train
    from ..train.loop import build_model

    out = Path(job["out"])
    config = load_config(job["config"], [*job["overrides"], f"output_dir={out}"])
    torch.manual_seed(job["seed"])
    heldout = text_corpus(600, 10_000 + job["seed"])
    row: dict[str, Any] = {}
    conditions = list(job["conditions"])
    if job["kind"] == "base_lm":  # the LM before any VLM training, asked without images
        model, processor = build_model(config)
        row.update(evaluate(model, processor, job, conditions, out))
        row["text_loss"] = text_loss(model, processor, heldout)
        row["trainable_params"], row["total_params"] = 0, trainable_counts(model)[1]
        row["tokens_per_image"] = 0
        return row

    stamps: list[float] = []
    at_budget: dict[str, Any] = {}
    seen: dict[str, int] = {}

    def on_step(trainer: Any) -> None:
        stamps.append(time.perf_counter())
        seen["tokens"] = trainer.tokens_seen
        model = trainer.strategy.unwrapped()
        if "params" not in seen:  # counted on the training model: LoRA's adapters, not the merged export
            seen["params"] = trainable_counts(model)
        if trainer.state.step == job["budget"]:
            at_budget.update(evaluate(model, trainer.processor, job, job["budget_conditions"], out / "budget"))
            model.train(True)
            stamps.append(time.perf_counter())  # the scoring pause is not a step

    started = time.perf_counter()
    summary = train(config, on_step=on_step)
    train_s = time.perf_counter() - started
    model, processor = load(out / "final")
    row.update(evaluate(model, processor, job, conditions, out))
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b > a]
    step_s = statistics.median(gaps) if gaps else float("nan")
    row.update(
        steps=summary["steps"], best_eval_step=summary.get("best_eval_step"),
        stopped_early=summary.get("stopped_early", False), final_loss=summary["final_loss"],
        eval_loss=summary.get("eval_loss"), train_s=train_s,
        step_ms=1000 * step_s, tokens_s=seen.get("tokens", 0) / max(summary["steps"], 1) / step_s,
        text_loss=text_loss(model, processor, heldout),
        tokens_per_image=model.fusion.tokens_per_image if job["kind"] == "vlm" else 0,
    )
    row["trainable_params"], row["total_params"] = seen.get("params", trainable_counts(model))
    # Stopped before the budget: the final model is the model at the budget.
    row["budget_scores"] = at_budget.get("scores") or {c: row["scores"][c] for c in job["budget_conditions"]}
    return row


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    job = json.loads(parser.parse_args(argv).job)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    row = run_job(job)
    row["peak_mem_mb"] = peak_memory_mb()
    (Path(job["out"]) / "bench.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
