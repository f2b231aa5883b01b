"""Batched generation over a data file, and scoring of saved predictions against it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.collator import Collator
from ..data.dataset import ConversationDataset
from ..data.formats import read_samples
from ..model import VLM
from ..processor import VLMProcessor
from ..progress import progress_bar
from .metrics import compute_metrics, infer_task

logger = logging.getLogger(__name__)


def predict(
    model: VLM, processor: VLMProcessor, data_file: str | Path, out: str | Path, image_root: str | Path | None = None,
    max_new_tokens: int = 32, batch_size: int = 16, image_drop: float = 0.0, seed: int = 0,
) -> int:
    """Answer the last user turn of every sample; write `{"id", "prediction"}` lines. Returns the count.

    image_drop: drop each image (and its tag) with this probability, seeded by `seed`, to measure
    how the model answers with missing images.
    """
    dataset = ConversationDataset.from_files(
        [str(data_file)], processor, image_root, for_generation=True, image_dropout=image_drop, seed=seed
    )
    for category, count in dataset.problems.items():
        logger.warning("%d sample(s) skipped: %s", count, category)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(processor.tokenizer.pad_token_id, "left"))
    model.eval()
    written = 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle, torch.inference_mode():
        for batch in progress_bar(loader, desc="predict", unit="batch"):
            for item in batch["skipped"]:
                logger.warning("Skipping sample '%s': %s", item["skipped"], item["detail"])
            if "input_ids" not in batch:
                continue
            for sample_id, text in zip(batch["ids"], model.generate_from_batch(batch, max_new_tokens)):
                handle.write(json.dumps({"id": sample_id, "prediction": text}) + "\n")
                written += 1
    return written


def evaluate_predictions(predictions: str | Path, data_file: str | Path) -> dict[str, Any]:
    """Join predictions to the data's reference answers by id and compute VQA / caption metrics.

    References: the sample's `answers` list when present, else the assistant reply to its
    last user turn. Task: the sample's `task` field, else inferred from answer length.
    """
    preds = {}
    for line in Path(predictions).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            preds[str(record["id"])] = record.get("prediction") or ""
    samples, _ = read_samples(data_file, image_root=None)
    records, missing = [], 0
    for sample in samples:
        references = sample.meta.get("answers") or [sample.reference_answer()]
        references = [r for r in references if r]
        if not references:
            continue
        if sample.id not in preds:
            missing += 1
            continue
        record = {
            "id": sample.id, "prediction": preds[sample.id], "references": references,
            "task": sample.meta.get("task") or infer_task(references),
        }
        if "type" in sample.meta:
            record["type"] = sample.meta["type"]
        records.append(record)
    metrics = compute_metrics(records)
    metrics["missing_predictions"] = missing
    return metrics
