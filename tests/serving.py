"""Helpers shared by the `vlm serve` and browser-chat tests: the synthetic test set as OpenAI messages,
and `vlm predict`'s answers to it."""

from __future__ import annotations

import json
from pathlib import Path

from vlm.data.formats import read_samples
from vlm.eval.predict import predict
from vlm.factory import load
from vlm.serve.api import openai_messages


def predictions(model_dir: Path, data_file: Path, out: Path, max_new_tokens: int = 32) -> dict[str, str]:
    """`vlm predict`'s answer to every sample of `data_file`, by id."""
    model, processor = load(model_dir)
    predict(model, processor, data_file, out, max_new_tokens=max_new_tokens, batch_size=16)
    return {r["id"]: r["prediction"] for r in map(json.loads, out.read_text().splitlines())}


def chat_requests(data_file: Path) -> dict[str, list[dict]]:
    """Each sample's OpenAI messages, by id."""
    samples, _ = read_samples(data_file, image_root=None)
    return {sample.id: openai_messages(sample) for sample in samples}
