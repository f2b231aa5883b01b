"""`vlm data check`: read every sample through the trainer's own code path before a long run."""

from __future__ import annotations

import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DataConfig, DataFile
from .formats import read_samples
from .validation import check_sample
from .images import load_images
from .sample import IMAGE_TAG, DataError, Sample, SampleError

if TYPE_CHECKING:  # the processor (vlm/processor.py) imports this package's modules
    from ..processor import VLMProcessor


@dataclass
class DataReport:
    samples: int = 0
    formats: Counter = field(default_factory=Counter)
    images_per_sample: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    """Tokens per good sample, image tokens included (empty when no processor was given)."""
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    details: dict[str, str] = field(default_factory=dict)
    coerced: list[str] = field(default_factory=list)
    """Good samples where a number stood in for text (used as text, but worth knowing)."""
    coerced_example: str = ""
    file_errors: list[str] = field(default_factory=list)
    """Files that could not be read at all, one line each (their samples are not counted)."""

    @property
    def bad(self) -> int:
        return sum(len(ids) for ids in self.problems.values())

    @property
    def failed(self) -> bool:
        return bool(self.bad or self.file_errors)

    def render(self, max_ids: int = 20) -> str:
        lines = [f"samples: {self.samples} ({self.samples - self.bad} good, {self.bad} bad)"]
        lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items())))
        lines.append("images per sample: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.images_per_sample.items())))
        if self.lengths:
            ordered = sorted(self.lengths)
            pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
            lines.append(
                f"tokens per sample (image tokens included): min {ordered[0]}, median {statistics.median(ordered):.0f}, "
                f"p95 {pct(0.95)}, max {ordered[-1]}"
            )
        for category, ids in sorted(self.problems.items()):
            shown = ", ".join(ids[:max_ids]) + (f", ... (+{len(ids) - max_ids})" if len(ids) > max_ids else "")
            lines.append(f"PROBLEM {category}: {len(ids)} sample(s): {shown}")
            lines.append(f"    e.g. {self.details[category]}")
        if self.coerced:
            shown = ", ".join(self.coerced[:max_ids]) + (f", ... (+{len(self.coerced) - max_ids})"
                                                        if len(self.coerced) > max_ids else "")
            lines.append(f"NOTE coerced: {len(self.coerced)} sample(s) have a number where text belongs, "
                         f"used as text: {shown}")
            lines.append(f"    e.g. {self.coerced_example}")
        lines += [f"FILE ERROR {message}" for message in self.file_errors]
        return "\n".join(lines)


def check_data(
    files: list[str | Path | DataFile], processor: VLMProcessor | None = None, image_root: str | Path | None = None,
    data: DataConfig | None = None, workers: int = 1,
) -> DataReport:
    """Every sample goes through what training does with it: parsing, structure checks, image
    decoding and, with a processor, tokenisation with the chat template and the length limit
    (or truncation, with `processor.truncate_text`). `data` supplies the table prompt templates.
    workers > 1: samples are checked in that many processes (image decoding dominates)."""
    report = DataReport()
    data = data or DataConfig()
    pool = None
    if workers > 1:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(processor, data.max_image_pixels))
    else:
        _init_worker(processor, data.max_image_pixels)
    try:
        for file in files:
            _check_file(report, file, image_root, data, pool, workers)
    finally:
        if pool is not None:
            pool.shutdown()
    return report


_WORKER: dict[str, object] = {}


def _init_worker(processor: VLMProcessor | None, max_image_pixels: int | None) -> None:
    _WORKER.update(processor=processor, max_image_pixels=max_image_pixels)


def _check_one(sample: Sample) -> tuple[int | None, SampleError | None]:
    """(tokens, None) for a good sample (tokens None without a processor), (None, error) for a bad one."""
    processor = _WORKER["processor"]
    try:
        if processor is None:
            check_sample(sample, IMAGE_TAG)
            load_images(sample, _WORKER["max_image_pixels"])
            return None, None
        return len(processor(sample)["input_ids"]), None
    except SampleError as err:
        return None, err


def _check_file(
    report: DataReport, file: str | Path | DataFile, image_root: str | Path | None, data: DataConfig,
    pool: ProcessPoolExecutor | None, workers: int,
) -> None:
    try:
        samples, errors = read_samples(file, image_root, caption_prompt=data.caption_prompt,
                                       vqa_prompt=data.vqa_prompt)
    except DataError as err:  # one unreadable file is reported; the other files are still checked
        report.file_errors.append(str(err))
        return
    report.samples += len(samples) + len(errors)
    for err in errors:
        _record(report, err)
    results = (pool.map(_check_one, samples, chunksize=max(1, min(256, len(samples) // (8 * workers))))
               if pool is not None else map(_check_one, samples))
    for sample, (tokens, error) in zip(samples, results):
        report.formats[sample.source_format] += 1
        report.images_per_sample[len(sample.images)] += 1
        if error is not None:
            _record(report, error)
            continue
        if tokens is not None:
            report.lengths.append(tokens)
        if sample.coerced:
            report.coerced.append(sample.id)
            report.coerced_example = report.coerced_example or f"sample '{sample.id}': {sample.coerced[0]}"


def _record(report: DataReport, err: SampleError) -> None:
    report.problems[err.category].append(err.sample_id)
    report.details.setdefault(err.category, str(err))
