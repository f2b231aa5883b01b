"""Evaluation metrics for VQA and captioning outputs."""

from vlm.eval.metrics import (
    bleu4,
    cider_d,
    compute_metrics,
    infer_task,
    normalize_vqa_answer,
    vqa_accuracy,
)

__all__ = [
    "bleu4",
    "cider_d",
    "compute_metrics",
    "infer_task",
    "normalize_vqa_answer",
    "vqa_accuracy",
]
