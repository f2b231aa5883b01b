"""Readers that turn annotation files into `Sample`s: LLaVA conversation JSON/JSONL and messages JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from .sample import IMAGE_TAG, Sample, SampleError

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_samples(path: str | Path, image_root: str | Path | None = None) -> tuple[list[Sample], list[SampleError]]:
    """Read one annotation file; samples that cannot even be parsed come back as errors, not exceptions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file '{path}' does not exist (check data.train_files / data.eval_files).")
    root = Path(image_root) if image_root else path.parent
    samples, errors = [], []
    for index, record in _records(path):
        sample_id = str(record.get("id", f"{path.name}:{index}")) if isinstance(record, dict) else f"{path.name}:{index}"
        try:
            samples.append(_to_sample(record, sample_id, root))
        except SampleError as err:
            errors.append(err)
    return samples, errors


def _records(path: Path) -> Iterator[tuple[int, Any]]:
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


def _to_sample(record: Any, sample_id: str, root: Path) -> Sample:
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", "is not a JSON object.")
    if "__error__" in record:
        raise SampleError(sample_id, "malformed", record["__error__"])
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else list(images or [])
    resolved = [str(Path(p) if Path(p).is_absolute() else root / p) for p in images]
    meta = {k: v for k, v in record.items() if k not in ("id", "image", "images", "conversations", "messages")}
    if "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            role = LLAVA_ROLES.get(turn.get("from", ""))
            if role is None:
                raise SampleError(sample_id, "malformed", f"unknown speaker {turn.get('from')!r}; use human / gpt / system.")
            messages.append({"role": role, "content": str(turn.get("value", ""))})
        source_format = "llava"
    elif "messages" in record:
        messages = [{"role": m.get("role", ""), "content": _text(m.get("content", ""))} for m in record["messages"]]
        source_format = "messages"
    else:
        raise SampleError(sample_id, "malformed", "has neither 'conversations' (LLaVA) nor 'messages'.")
    return Sample(id=sample_id, messages=messages, images=resolved, meta=meta, source_format=source_format)


def _text(content: Any) -> str:
    """Messages content may be a string or a list of {"type": "image"} / {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") == "image":
            parts.append(IMAGE_TAG)
        elif part.get("type") == "text":
            parts.append(part.get("text", ""))
    return "".join(parts)
