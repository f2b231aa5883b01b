"""The Python side of `lmms_tasks/vlm_synthetic_vqa.yaml`: local VQA questions for lmms-eval.

The docs come from a data file the project reads (`read_samples`, any format `vlm predict` takes),
not from a hub dataset: `$VLM_LMMS_DATA`, else the task's `dataset_path`. Each doc is one question
(one user turn); caption samples are left out. Scoring is lmms-eval's own VQA answer normalisation
(`EvalAIAnswerProcessor`, as its TextVQA / VQAv2 tasks), so agreement with `vlm eval` compares two
independent scorers on the same predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from PIL import Image

from ..config import ConfigError
from ..data.formats import read_samples
from ..data.images import load_images
from ..data.sample import Sample
from .metrics import infer_task

DATA_ENV = "VLM_LMMS_DATA"
IMAGE_TAG = "<image>"  # how `Sample` text marks an image, whatever the model's own image token
_normalize = EvalAIAnswerProcessor()


class LocalVQATask(ConfigurableTask):
    """A `ConfigurableTask` whose docs are read from a local file instead of `datasets.load_dataset`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        path = os.environ.get(DATA_ENV) or self.config.dataset_path
        if not path or not os.path.isfile(path):
            raise ConfigError(f"{self.config.task}: data file '{path}' not found; set {DATA_ENV}=FILE (e.g. the "
                              "test.json of scripts/make_synthetic_data.py) or run `make quickstart` first.")
        docs = vqa_docs(path)
        if not docs:
            raise ConfigError(f"{self.config.task}: '{path}' has no single-turn VQA question; point {DATA_ENV} at "
                              "a per-question test file.")
        self.dataset = datasets.DatasetDict({self.config.test_split: datasets.Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset


def vqa_docs(path: str) -> list[dict[str, Any]]:
    """One doc per single-turn VQA sample: id, question, image paths, reference answers, type."""
    samples, _ = read_samples(path)
    docs = []
    for sample in samples:
        references = [r for r in sample.meta.get("answers") or [sample.reference_answer()] if r]
        prompt = sample.prompt_messages()
        if not references or len(prompt) != 1 or (sample.meta.get("task") or infer_task(references)) != "vqa":
            continue
        docs.append({"id": sample.id, "question": prompt[0]["content"], "images": [str(i) for i in sample.images],
                     "answers": references, "answer": references[0], "type": str(sample.meta.get("type", ""))})
    return docs


def logged_answers(output_path: str | Path, data_file: str | Path, task: str = "vlm_synthetic_vqa") -> dict[str, str]:
    """{sample id: answer} from an `lmms-eval --log_samples --output_path DIR` run of this task (its log
    names docs by position), ready to write as `vlm eval` predictions."""
    logs = sorted(Path(output_path).rglob(f"*_samples_{task}.jsonl"))
    if not logs:
        raise FileNotFoundError(f"No *_samples_{task}.jsonl under {output_path}; run lmms-eval with --log_samples.")
    ids = [doc["id"] for doc in vqa_docs(str(data_file))]
    records = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    return {ids[r["doc_id"]]: r["filtered_resps"] for r in records}


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The doc's images, decoded as `vlm predict` decodes them."""
    return load_images(Sample(id=doc["id"], messages=[], images=list(doc["images"])))


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question without its leading `<image>` tags: lmms-eval models place images themselves (the
    vlm model type puts each one on its own line in front, as the synthetic data has it)."""
    text = doc["question"]
    while text.startswith(IMAGE_TAG):
        text = text[len(IMAGE_TAG):].lstrip("\n")
    return text


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """VQA accuracy with lmms-eval's normalisation: with one reference, exact match; with several,
    min(matching references / 3, 1)."""
    prediction = _normalize(results[0])
    matches = sum(_normalize(ref) == prediction for ref in doc["answers"])
    score = float(matches) if len(doc["answers"]) == 1 else min(1.0, matches / 3.0)
    return {"vqa_accuracy": score}
