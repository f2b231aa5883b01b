"""Test-time image corruptions for robustness benchmarks: Gaussian noise, blur and occlusion at three severities.

`corrupt(image, kind, severity, seed)` is a pure function of its arguments (RGB in, RGB out, same size),
scaled with the image so a severity means the same at 64 px and 384 px. `corrupt_data_file` writes a
corrupted copy of a LLaVA-style JSON data file: every referenced image corrupted once (PNG), with its own
seed derived from the run's seed and the image's relative path, and the records pointing at the copies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..atomic import atomic_file, write_text_atomic

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corrupt_data_file", "parse_corruption"]

CORRUPTIONS = ("noise", "blur", "occlusion")
SEVERITIES = (1, 2, 3)

NOISE_SIGMA = (0.08, 0.16, 0.32)
"""Gaussian noise standard deviation per channel, as a fraction of 255."""
BLUR_RADIUS = (0.75, 1.5, 3.0)
"""Gaussian blur radius in pixels at a 64 px short side; scaled with the short side."""
OCCLUDED_AREA = (0.10, 0.25, 0.50)
"""Fraction of the image covered by the grey occluder."""
OCCLUDER_GREY = 128
_IMAGE_KEYS = ("image", "images")


def _check(kind: str, severity: int) -> int:
    """The 0-based index of `severity`, after checking `kind` and `severity`."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption '{kind}'; choose one of {', '.join(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"Corruption severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity!r}.")
    return SEVERITIES.index(severity)


def corrupt(image: Image.Image, kind: str, severity: int, seed: int) -> Image.Image:
    """`image` corrupted by `kind` ("noise", "blur", "occlusion") at `severity` (1-3), deterministic in `seed`."""
    level = _check(kind, severity)
    image = image.convert("RGB")
    width, height = image.size
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS[level] * min(width, height) / 64))
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float64)
    if kind == "noise":
        pixels = pixels + rng.normal(0.0, NOISE_SIGMA[level] * 255.0, size=pixels.shape)
    else:
        h, w = _occluder_size(width, height, OCCLUDED_AREA[level])
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        pixels = pixels.copy()
        pixels[top : top + h, left : left + w] = OCCLUDER_GREY
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _occluder_size(width: int, height: int, fraction: float) -> tuple[int, int]:
    """(height, width) of the occluder: a square of `fraction` of the area, or, where such a square does not
    fit (a very elongated image), a rectangle of that area spanning the short side."""
    area = fraction * width * height
    side = max(1, round(area**0.5))
    if side <= min(width, height):
        return side, side
    if width >= height:
        return height, min(width, max(1, round(area / height)))
    return min(height, max(1, round(area / width))), width


def parse_corruption(spec: str) -> tuple[str, int]:
    """"noise:2" -> ("noise", 2); anything else is a one-line ValueError naming the valid forms."""
    kind, sep, level = str(spec).strip().partition(":")
    valid = f"expected KIND:SEVERITY with KIND one of {', '.join(CORRUPTIONS)} and SEVERITY one of " \
            f"{', '.join(map(str, SEVERITIES))} (e.g. noise:2)"
    if not sep or not level.strip().isdigit():
        raise ValueError(f"Bad corruption '{spec}': {valid}.")
    kind, severity = kind.strip(), int(level)
    if kind not in CORRUPTIONS or severity not in SEVERITIES:
        raise ValueError(f"Bad corruption '{spec}': {valid}.")
    return kind, severity


def image_seed(seed: int, relative_path: str) -> int:
    """The seed of one image: a stable hash of the run's seed and the image's path as written in the data."""
    digest = hashlib.sha256(f"{seed}\0{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _output_name(relative_path: str) -> str:
    """Where an image's corrupted copy goes under `images/`: its relative path (`.png` appended unless it
    has it), or, for an absolute path or one leaving the root, a hashed name."""
    path = Path(relative_path)
    if path.is_absolute() or ".." in path.parts:
        path = Path(hashlib.sha256(relative_path.encode()).hexdigest()[:16]) / path.name
    name = path.as_posix()
    return name if path.suffix.lower() == ".png" else f"{name}.png"


def corrupt_data_file(
    data_file: str | Path, out_dir: str | Path, kind: str, severity: int, seed: int = 0,
    image_root: str | Path | None = None,
) -> Path:
    """Write `out_dir/<stem>.json`: the records of `data_file` (a JSON list of LLaVA-style records) with
    every `image` / `images` path pointing at a corrupted PNG copy under `out_dir/images/` (paths relative
    to `out_dir`). Image paths are read relative to `image_root`, else to the data file's folder. Records
    without an image pass through unchanged; an image shared by several records is corrupted once.
    Returns the new JSON file's path."""
    _check(kind, severity)
    data_file, out_dir = Path(data_file), Path(out_dir)
    root = Path(image_root) if image_root is not None else data_file.parent
    records = json.loads(data_file.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"'{data_file}' must hold a JSON list of records, got {type(records).__name__}.")
    written: dict[str, str] = {}  # image path as written -> the copy's path relative to out_dir

    def copy(relative: Any) -> Any:
        if not isinstance(relative, str):
            return relative  # not a path (e.g. inline bytes): left as it is
        if relative not in written:
            target = f"images/{_output_name(relative)}"
            with Image.open(root / relative) as source:
                corrupted = corrupt(source, kind, severity, image_seed(seed, relative))
            with atomic_file(out_dir / target) as tmp:
                corrupted.save(tmp, format="PNG")
            written[relative] = target
        return written[relative]

    out = []
    for record in records:
        if isinstance(record, dict) and any(record.get(key) for key in _IMAGE_KEYS):
            record = dict(record)
            for key in _IMAGE_KEYS:
                value = record.get(key)
                if isinstance(value, list):
                    record[key] = [copy(item) for item in value]
                elif value:
                    record[key] = copy(value)
        out.append(record)
    target = out_dir / f"{data_file.stem}.json"
    write_text_atomic(target, json.dumps(out, indent=1, ensure_ascii=False))
    return target
