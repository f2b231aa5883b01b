"""Several data files as one training set, each repeated or subsampled by its weight."""

from __future__ import annotations

import math
import random
from pathlib import Path

from ..config import DataConfig, DataFile
from .formats import read_samples
from .sample import Sample, SampleError


def read_files(
    entries: list[str | DataFile], image_root: str | Path | None = None, data: DataConfig | None = None,
    seed: int = 0,
) -> tuple[list[Sample], list[SampleError]]:
    """Every entry read with `read_samples`; a weighted entry's samples appear `weight` times per epoch.

    weight 2.0: each sample twice; 0.5: a fixed random half (chosen by `seed`, the same every epoch
    and on every rank). Errors are reported once, whatever the weight.
    """
    data = data or DataConfig()
    samples, errors = [], []
    for position, entry in enumerate(entries):
        got, bad = read_samples(entry, image_root, caption_prompt=data.caption_prompt, vqa_prompt=data.vqa_prompt)
        weight = entry.weight if isinstance(entry, DataFile) else 1.0
        samples += weighted(got, weight, seed + position)
        errors += bad
    return samples, errors


def weighted(samples: list[Sample], weight: float, seed: int = 0) -> list[Sample]:
    """`floor(weight)` full copies plus a seeded random subset for the fractional part."""
    whole, fraction = int(math.floor(weight)), weight - math.floor(weight)
    out = samples * whole
    extra = round(fraction * len(samples))
    if extra:
        chosen = sorted(random.Random(seed).sample(range(len(samples)), extra))
        out += [samples[i] for i in chosen]
    return out
