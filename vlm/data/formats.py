"""Readers that turn annotation files into `Sample`s.

Containers (a file or folder -> records) are readers in `vlm/data/readers/`, one file each: LLaVA JSON
(a list), JSONL, and everything `datasets` reads. A new container is one reader file plus its test.
Record kinds, recognised by their keys, whatever the container:
  `conversations` (LLaVA, `from: human|gpt|system`), `messages` (TRL / LLaMA-Factory; content a
  string or `{"type": "image"|"text"}` parts), `caption` (captioning table) and `question` +
  `answer`|`answers` (VQA table), the last two turned into a conversation by the
  `data.caption_prompt` / `data.vqa_prompt` templates; `prompt` + `chosen` + `rejected` (TRL's preference
  format, standard or conversational: a preference pair, `Sample.rejected`).
Images: `image` (one) or `images` (a list), each a path (relative to `data.image_root` or the
file's folder), a PIL image, bytes, `{"bytes", "path"}`, or a `DatasetImage` cell reference.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..config import DataConfig, DataFile
from .content import content_text, with_image_tags
from .describe import describe as _kind, short as _short
from .hf_datasets import DatasetImage
from .readers import reader_for
from .sample import DataError, ImageRef, Sample, SampleError

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_CAPTION_PROMPT = DataConfig.caption_prompt
DEFAULT_VQA_PROMPT = DataConfig.vqa_prompt
_CONTENT_KEYS = ("id", "image", "images", "conversations", "messages", "prompt", "chosen", "rejected")


def read_samples(
    path: str | Path | DataFile, image_root: str | Path | None = None, *,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT, vqa_prompt: str = DEFAULT_VQA_PROMPT,
) -> tuple[list[Sample], list[SampleError]]:
    """Read one annotation file or dataset; samples that cannot be parsed come back as errors, not exceptions.

    A file that cannot be read at all (missing, not JSON, not UTF-8) is one `DataError` naming it.
    A `DataFile` entry's weight is ignored here (see `mixture.read_files`).
    """
    path = Path(path.path if isinstance(path, DataFile) else path)
    if not path.exists():
        raise DataError(f"Data file '{path}' does not exist (check data.train_files / data.eval_files).")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    records, container = reader_for(path)(path)
    samples, errors = [], []
    for index, record in records:
        sample_id = _sample_id(record, path, index)
        try:
            sample = record_to_sample(record, sample_id, root, caption_prompt, vqa_prompt)
        except SampleError as err:
            errors.append(err)
            continue
        if container:
            sample.source_format = f"{sample.source_format}:{container}"
        samples.append(sample)
    return samples, errors


def _sample_id(record: Any, path: Path, index: int) -> str:
    """The record's own `id` when it is a usable one (text or an integer), else its position in the file."""
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
        return str(value)
    return f"{path.name}:{index}"


def record_to_sample(
    record: Any, sample_id: str, root: Path,
    caption_prompt: str = DEFAULT_CAPTION_PROMPT, vqa_prompt: str = DEFAULT_VQA_PROMPT,
) -> Sample:
    """One record of any kind -> `Sample`; a record that cannot be understood is a `SampleError`.

    Text fields take strings; a number is used as text and noted in `Sample.coerced`; any other
    shape (a list, an object, true/false) where text or a turn belongs is a `malformed` sample."""
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", f"is {_kind(record)}, not a JSON object.")
    if "__error__" in record:
        raise SampleError(sample_id, "malformed", record["__error__"])
    images = record.get("images") if record.get("images") is not None else record.get("image")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    resolved = [_image_ref(image, root, sample_id) for image in images]
    meta = {k: v for k, v in record.items() if k not in _CONTENT_KEYS and not isinstance(v, (bytes, DatasetImage))}
    coerced: list[str] = []
    text = lambda value, where: _as_text(value, where, sample_id, coerced)  # noqa: E731
    if record.get("chosen") is not None or record.get("rejected") is not None:
        messages, rejected = _preference(record, len(resolved), text, sample_id)
        return Sample(id=sample_id, messages=messages, images=resolved, meta=meta, source_format="preference",
                      coerced=coerced, rejected=rejected)
    if record.get("conversations") is not None:
        messages = []
        for i, turn in enumerate(_turns(record["conversations"], "conversations", sample_id)):
            speaker = turn.get("from") or turn.get("role")
            role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
            if role is None:
                raise SampleError(sample_id, "malformed",
                                  f"turn {i} has unknown speaker {_short(speaker)}; use human / gpt / system.")
            messages.append({"role": role, "content": text(turn.get("value"), f"turn {i}'s 'value'")})
        kind = "llava"
    elif record.get("messages") is not None:
        messages = [
            {"role": m.get("role") or "",
             "content": _content(m.get("content"), f"message {i}'s 'content'", text, sample_id)}
            for i, m in enumerate(_turns(record["messages"], "messages", sample_id))
        ]
        kind = "messages"
    elif record.get("question") is not None:
        answers = _answers(record, text, sample_id)
        if not answers:
            raise SampleError(sample_id, "malformed", "is a VQA row without 'answer' or 'answers'.")
        answer = Counter(answers).most_common(1)[0][0]
        question = text(record["question"], "'question'")
        prompt = with_image_tags(vqa_prompt.format(question=question), len(resolved))
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        meta.pop("answer", None)
        meta["answers"] = answers
        kind = "vqa"
    elif record.get("caption") is not None:
        prompt = with_image_tags(caption_prompt, len(resolved))
        caption = text(record["caption"], "'caption'")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]
        meta.pop("caption", None)
        meta.setdefault("task", "caption")
        kind = "caption"
    else:
        raise SampleError(
            sample_id, "malformed",
            "has none of 'conversations' (LLaVA), 'messages', 'caption' or 'question' (tables).",
        )
    return Sample(id=sample_id, messages=messages, images=resolved, meta=meta, source_format=kind, coerced=coerced)


def _preference(record: dict[str, Any], num_images: int, text: Callable[[Any, str], str],
                sample_id: str) -> tuple[list[dict[str, str]], str]:
    """TRL's preference record -> (prompt messages + the chosen reply, the rejected reply). `prompt`: a string (one
    user turn; a `<image>` tag added per image it lacks, as for VQA rows) or messages; `chosen` / `rejected`: a
    string or one assistant message (TRL's conversational form)."""
    prompt = record.get("prompt")
    if prompt is None:
        raise SampleError(sample_id, "malformed", "is a preference pair without 'prompt'; TRL's format is "
                          '{"prompt": ..., "chosen": ..., "rejected": ...}.')
    if isinstance(prompt, list):
        messages = [
            {"role": m.get("role") or "", "content": _content(m.get("content"), f"prompt message {i}'s 'content'",
                                                              text, sample_id)}
            for i, m in enumerate(_turns(prompt, "prompt", sample_id))
        ]
    else:
        messages = [{"role": "user", "content": with_image_tags(text(prompt, "'prompt'"), num_images)}]
    replies = []
    for side in ("chosen", "rejected"):
        value = record.get(side)
        if isinstance(value, list):
            turns = _turns(value, side, sample_id)
            if len(turns) != 1 or turns[0].get("role") != "assistant":
                raise SampleError(sample_id, "malformed", f"'{side}' must be one assistant message "
                                  '([{"role": "assistant", "content": "..."}]) or a string.')
            value = _content(turns[0].get("content"), f"'{side}' content", text, sample_id)
        replies.append(text(value, f"'{side}'"))
    return [*messages, {"role": "assistant", "content": replies[0]}], replies[1]


_TURN_EXAMPLE = {"conversations": '{"from": "human", "value": "..."}', "messages": '{"role": "user", "content": "..."}',
                 "prompt": '{"role": "user", "content": "..."}', "chosen": '{"role": "assistant", "content": "..."}',
                 "rejected": '{"role": "assistant", "content": "..."}'}


def _turns(value: Any, key: str, sample_id: str) -> list[dict[str, Any]]:
    """`conversations` / `messages` must be a list of objects; say which part is not."""
    if not isinstance(value, list):
        raise SampleError(sample_id, "malformed",
                          f"'{key}' is {_kind(value)}; it must be a list of turns like {_TURN_EXAMPLE[key]}.")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise SampleError(sample_id, "malformed", f"'{key}' turn {i} is {_kind(turn)}; "
                              f"each turn must be an object like {_TURN_EXAMPLE[key]}.")
    return value


def _as_text(value: Any, where: str, sample_id: str, coerced: list[str]) -> str:
    """A string as is; null (or a table's empty NaN cell) as empty text, which the checks report as an
    empty turn; a number as its text, noted in `coerced`; anything else is a malformed sample."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        coerced.append(f"{where} is the number {value!r}")
        return str(value)
    raise SampleError(sample_id, "malformed", f"{where} is {_kind(value)}, not text; write it as a string.")


def _image_ref(image: Any, root: Path, sample_id: str) -> ImageRef:
    if isinstance(image, dict):  # datasets' undecoded Image cell
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str):
        return str(Path(image) if Path(image).is_absolute() else root / image)
    if isinstance(image, (bytes, Image.Image, DatasetImage)):
        return image
    raise SampleError(sample_id, "malformed", f"has an image of type {type(image).__name__}; use a path, bytes or PIL image.")


def _answers(record: dict[str, Any], text: Callable[[Any, str], str], sample_id: str) -> list[str]:
    answers = record.get("answers")
    if isinstance(answers, str) and answers.startswith("["):  # a JSON list in a CSV cell
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError as err:
            raise SampleError(sample_id, "malformed",
                              f"'answers' starts like a JSON list but is not valid JSON ({err.msg}).") from None
    if answers is None:
        answers = [] if record.get("answer") is None else [record["answer"]]
    if not isinstance(answers, list):
        answers = [answers]
    out = []
    for i, a in enumerate(answers):
        if isinstance(a, dict):  # VQAv2 style: {"answer": ..., "answer_confidence": ...}
            a = a.get("answer", a)
        out.append(text(a, f"answer {i}"))
    return out


def _content(content: Any, where: str, text: Callable[[Any, str], str], sample_id: str) -> str:
    """Messages content: a string or a list of {"type": "image"} / {"type": "text"} parts (vlm/data/content.py)."""
    def accept_image(part: dict[str, Any], here: str) -> None:
        if part.get("type") != "image":
            raise SampleError(sample_id, "malformed", f"{here} is an {part.get('type')!r} part; in data files an image "
                              'part is {"type": "image"}, with the image itself in the record\'s "image" / "images".')

    def bad_part(here: str, part: Any) -> SampleError:
        what = _kind(part) if not isinstance(part, dict) else f"a part of type {_short(part.get('type'))}"
        return SampleError(sample_id, "malformed", f"{here} is {what}; parts are objects like "
                           '{"type": "text", "text": "..."} or {"type": "image"}.')

    return content_text(content, where, text, accept_image, bad_part, part_where="{where} part {k}")
