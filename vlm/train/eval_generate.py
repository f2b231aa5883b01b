"""Generation-based evaluation during training (`train.eval_generate`): answer `data.eval_files` the way
`vlm predict` does and score them the way `vlm eval` does (VQA accuracy, BLEU-4, CIDEr-D).

Rank 0 generates alone on its full copy of the model while the other ranks wait at a barrier: with
`single`, `ddp` and `zero2` every rank holds every weight. `fsdp2` and `zero3` shard the weights, so
every rank would have to run each forward of `generate` in lockstep (a rank that stops early on EOS
leaves the others waiting in an all-gather); that is refused when the config is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError
from ..eval.metrics import compute_metrics
from ..eval.predict import predict, read_predictions, reference_records
from ..model import VLM
from ..processor import VLMProcessor

__all__ = ["check_eval_generate", "generation_metrics", "tracker_values"]

SHARDED = ("fsdp2", "zero3")


def check_eval_generate(config: Config, strategy: str) -> None:
    """Before step 1: an eval set, and a strategy that keeps a full model on rank 0."""
    if not config.train.eval_generate:
        return
    if not config.data.eval_files:
        raise ConfigError("train.eval_generate needs an eval set; set data.eval_files (or train.eval_generate=false).")
    if strategy in SHARDED:
        raise ConfigError(f"train.eval_generate is not supported with train.strategy={strategy} (sharded weights); "
                          "use ddp or zero2, or evaluate final/ with `vlm predict` / lmms-eval after training.")


@torch.no_grad()
def generation_metrics(model: VLM, processor: VLMProcessor, config: Config, step: int) -> dict[str, Any]:
    """Answer the first `train.eval_generate_samples` eval samples (all when unset) and score them; the
    answers are kept in `output_dir/eval_predictions/step-<step>.jsonl`."""
    train, data = config.train, config.data
    out = Path(config.output_dir) / "eval_predictions" / f"step-{step}.jsonl"
    was_training = model.training
    try:
        predict(model, processor, list(data.eval_files), out, data.image_root, train.eval_max_new_tokens,
                train.eval_batch_size or train.batch_size, limit=train.eval_generate_samples, data=data)
    finally:
        model.train(was_training)
    records, _ = reference_records(read_predictions(out), list(data.eval_files), data)
    return compute_metrics(records)


def tracker_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat scalars for the eval history and the trackers (logged as `eval/<name>`): vqa_accuracy,
    vqa_accuracy/<type>, bleu4, cider_d (each only when the eval set has that task)."""
    values: dict[str, float] = {}
    if "vqa" in metrics:
        values["vqa_accuracy"] = metrics["vqa"]["accuracy"]
        for name, entry in metrics["vqa"]["per_type"].items():
            values[f"vqa_accuracy/{name}"] = entry["accuracy"]
    if "caption" in metrics:
        values["bleu4"] = metrics["caption"]["bleu4"]
        values["cider_d"] = metrics["caption"]["cider_d"]
    return values
