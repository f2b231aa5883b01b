"""Readers that turn annotation files into `Sample`s.

Containers: LLaVA JSON (a list), JSONL, and everything `datasets` reads (see `hf_datasets`).
Record kinds, recognised by their keys, whatever the container:
  `conversations` (LLaVA, `from: human|gpt|system`), `messages` (TRL / LLaMA-Factory; content a
  string or `{"type": "image"|"text"}` parts), `caption` (captioning table) and `question` +
  `answer`|`answers` (VQA table), the last two turned into a conversation by the
  `data.caption_prompt` / `data.vqa_prompt` templates.
Images: `image` (one) or `images` (a list), each a path (relative to `data.image_root` or the
file's folder), a PIL image, bytes, `{"bytes", "path"}`, or a `DatasetImage` cell reference.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ..config import DataConfig, DataFile
from .hf_datasets import DatasetImage, hf_records, is_hf_source, load_hf_dataset
from .sample import IMAGE_TAG, ImageRef, Sample, SampleError

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_CAPTION_PROMPT = DataConfig.caption_prompt
DEFAULT_VQA_PROMPT = DataConfig.vqa_prompt
_CONTENT_KEYS = ("id", "image", "images", "conversations", "messages")


def read_samples(
    path: str | Path | DataFile, image_root: str | Path | None = None, *,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT, vqa_prompt: str = DEFAULT_VQA_PROMPT,
) -> tuple[list[Sample], list[SampleError]]:
    """Read one annotation file or dataset; samples that cannot be parsed come back as errors, not exceptions.

    A `DataFile` entry's weight is ignored here (see `mixture.read_files`).
    """
    path = Path(path.path if isinstance(path, DataFile) else path)
    if not path.exists():
        raise FileNotFoundError(f"Data file '{path}' does not exist (check data.train_files / data.eval_files).")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    if is_hf_source(path):
        dataset, loader = load_hf_dataset(path)
        records, container = hf_records(dataset), loader
    else:
        records, container = _json_records(path), None
    samples, errors = [], []
    for index, record in records:
        sample_id = str(record.get("id", f"{path.name}:{index}")) if isinstance(record, dict) else f"{path.name}:{index}"
        try:
            sample = record_to_sample(record, sample_id, root, caption_prompt, vqa_prompt)
        except SampleError as err:
            errors.append(err)
            continue
        if container:
            sample.source_format = f"{sample.source_format}:{container}"
        samples.append(sample)
    return samples, errors


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        for index, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as err:
                    yield index, {"id": f"{path.name}:line {index + 1}", "__error__": f"invalid JSON ({err.msg})"}
        return
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"'{path}' must hold a JSON list of samples (LLaVA format), got {type(data).__name__}.")
    yield from enumerate(data)


def record_to_sample(
    record: Any, sample_id: str, root: Path,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT, vqa_prompt: str = DEFAULT_VQA_PROMPT,
) -> Sample:
    """One record of any kind -> `Sample`; a record that cannot be understood is a `SampleError`."""
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", "is not a JSON object.")
    if "__error__" in record:
        raise SampleError(sample_id, "malformed", record["__error__"])
    images = record.get("images") if record.get("images") is not None else record.get("image")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    resolved = [_image_ref(image, root, sample_id) for image in images]
    meta = {k: v for k, v in record.items() if k not in _CONTENT_KEYS and not isinstance(v, (bytes, DatasetImage))}
    if record.get("conversations") is not None:
        messages = []
        for turn in record["conversations"]:
            role = LLAVA_ROLES.get(turn.get("from") or turn.get("role") or "")
            if role is None:
                raise SampleError(sample_id, "malformed", f"unknown speaker {turn.get('from')!r}; use human / gpt / system.")
            messages.append({"role": role, "content": str(turn.get("value") or "")})
        kind = "llava"
    elif record.get("messages") is not None:
        messages = [{"role": m.get("role") or "", "content": _text(m.get("content") or "")} for m in record["messages"]]
        kind = "messages"
    elif record.get("question") is not None:
        answers = _answers(record)
        if not answers:
            raise SampleError(sample_id, "malformed", "is a VQA row without 'answer' or 'answers'.")
        answer = Counter(answers).most_common(1)[0][0]
        prompt = _with_image_tags(vqa_prompt.format(question=record["question"]), len(resolved))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        meta.pop("answer", None)
        meta["answers"] = answers
        kind = "vqa"
    elif record.get("caption") is not None:
        prompt = _with_image_tags(caption_prompt, len(resolved))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record["caption"])}]
        meta.pop("caption", None)
        meta.setdefault("task", "caption")
        kind = "caption"
    else:
        raise SampleError(
            sample_id, "malformed",
            "has none of 'conversations' (LLaVA), 'messages', 'caption' or 'question' (tables).",
        )
    return Sample(id=sample_id, messages=messages, images=resolved, meta=meta, source_format=kind)


def _image_ref(image: Any, root: Path, sample_id: str) -> ImageRef:
    if isinstance(image, dict):  # datasets' undecoded Image cell
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        return str(Path(image) if Path(image).is_absolute() else root / image)
    if isinstance(image, (bytes, Image.Image, DatasetImage)):
        return image
    raise SampleError(sample_id, "malformed", f"has an image of type {type(image).__name__}; use a path, bytes or PIL image.")


def _answers(record: dict[str, Any]) -> list[str]:
    answers = record.get("answers")
    if isinstance(answers, str) and answers.startswith("["):  # a JSON list in a CSV cell
        answers = json.loads(answers)
    if answers is None:
        answers = [] if record.get("answer") is None else [record["answer"]]
    if not isinstance(answers, list):
        answers = [answers]
    return [str(a["answer"] if isinstance(a, dict) else a) for a in answers]


def _with_image_tags(prompt: str, num_images: int) -> str:
    """Templates may omit `<image>`: the missing tags go first, one line each."""
    missing = num_images - prompt.count(IMAGE_TAG)
    return f"{IMAGE_TAG}\n" * max(missing, 0) + prompt


def _text(content: Any) -> str:
    """Messages content may be a string or a list of {"type": "image"} / {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") == "image":
            parts.append(IMAGE_TAG)
        elif part.get("type") == "text":
            parts.append(part.get("text") or "")
    return "".join(parts)
