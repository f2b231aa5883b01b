"""Figures the tests derive from a backbone's saved config, so an assert names the exact expected count."""

from __future__ import annotations

import json
from pathlib import Path


def patch_grid(vit: Path) -> tuple[int, int]:
    """(rows, cols) of patches a saved timm ViT (`local-dir:` folder) cuts its input into."""
    args = json.loads((Path(vit) / "config.json").read_text())["model_args"]
    size, patch = args["img_size"], args["patch_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return height // patch, width // patch


def projector_tokens(vit: Path, factor: int = 1) -> int:
    """Text positions a `projector` fusion gives one image: its patches, each factor x factor block folded
    into one token by `pixel_shuffle` (factor 1 for `linear` and `mlp2x_gelu`)."""
    rows, cols = patch_grid(vit)
    return (rows // factor) * (cols // factor)
