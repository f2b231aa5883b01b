"""Batched generation over a data file, and scoring of saved predictions against it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from ..config import DataConfig, DataFile
from ..data.collator import Collator
from ..data.dataset import ConversationDataset
from ..data.formats import read_samples
from ..model import VLM
from ..processor import VLMProcessor
from ..progress import progress_bar
from .metrics import compute_metrics, infer_task

logger = logging.getLogger(__name__)


DataFiles = str | Path | DataFile | list[str | DataFile]


def predict(
    model: VLM, processor: VLMProcessor, data_file: DataFiles, out: str | Path, image_root: str | Path | None = None,
    max_new_tokens: int = 32, batch_size: int = 16, image_drop: float = 0.0, seed: int = 0,
    limit: int | None = None, data: DataConfig | None = None, dropped_image: str = "remove",
) -> int:
    """Answer the last user turn of every sample; write `{"id", "prediction"}` lines. Returns the count.

    data_file: one file, or a list as `data.eval_files`. image_drop: drop each image (and its tag) with
    this probability, seeded by `seed`, to measure how the model answers with missing images;
    dropped_image: where a dropped image goes, `remove` or `blank` (as in training, vlm/data/dropout.py).
    limit: only the first `limit` samples. data: the training config's data section (prompt templates).
    """
    files = [str(f) if isinstance(f, Path) else f for f in (data_file if isinstance(data_file, list) else [data_file])]
    dataset = ConversationDataset.from_files(
        files, processor, image_root, for_generation=True, image_dropout=image_drop, seed=seed, data=data,
        dropped_image=dropped_image,
    )
    for category, count in dataset.problems.items():
        logger.warning("%d sample(s) skipped: %s", count, category)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(processor.tokenizer.pad_token_id, "left"))
    model.eval()
    written = 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle, torch.inference_mode():
        for batch in progress_bar(loader, desc="predict", unit="batch"):
            for item in batch.skipped:
                logger.warning("Skipping sample '%s': %s", item["skipped"], item["detail"])
            if not batch.has_inputs:
                continue
            answers = processor.decode(model.generate(**batch.generation_inputs(), max_new_tokens=max_new_tokens))
            for sample_id, text in zip(batch.ids, answers):
                handle.write(json.dumps({"id": sample_id, "prediction": text}) + "\n")
                written += 1
    return written


def evaluate_predictions(predictions: str | Path, data_file: str | Path) -> dict[str, Any]:
    """Join predictions to the data's reference answers by id and compute VQA / caption metrics."""
    records, missing = reference_records(read_predictions(predictions), data_file)
    metrics = compute_metrics(records)
    metrics["missing_predictions"] = missing
    return metrics


def read_predictions(path: str | Path) -> dict[str, str]:
    """`{"id", "prediction"}` lines (as `predict` writes them) -> {id: prediction}."""
    preds = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            preds[str(record["id"])] = record.get("prediction") or ""
    return preds


def reference_records(
    preds: dict[str, str], data_file: DataFiles, data: DataConfig | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """`compute_metrics` records for the samples that have a prediction, and how many samples with references
    have none.

    References: the sample's `answers` list when present, else the assistant reply to its
    last user turn. Task: the sample's `task` field, else inferred from answer length.
    """
    data = data or DataConfig()
    records, missing = [], 0
    for entry in data_file if isinstance(data_file, list) else [data_file]:
        samples, _ = read_samples(entry, image_root=None, caption_prompt=data.caption_prompt,
                                  vqa_prompt=data.vqa_prompt)
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
    return records, missing
